"""Peak memory and time of ONE end-to-end training step: streamed chunked backprop vs naive full bag.

    .venv/bin/python bench/e2e_memory.py                       # CPU: 32 px patches, narrow encoder
    .venv/bin/python bench/e2e_memory.py --patch-px 224 --width 64 --device cuda   # GPU, full size

Every (method, N) case runs in a FRESH subprocess. Memory method:
- CPU: peak RSS of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the RSS
  after setup (models built, one warm-up step on a 2-chunk bag, gradients allocated), i.e. the
  growth caused by the measured step. The warm-up already held one chunk of activations, so
  memory the allocator kept from it is in the baseline (printed as "warm-up MB");
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes after setup.
Time: the fastest of ``--repeats`` steps on the same bag (gradients accumulate; irrelevant here).
Patches come from an in-memory generator (deterministic uint8 noise made per chunk on
request on the step's device, never all held), not from a patch store, so reading costs are
the same for both methods. The naive step keeps one autograd graph over the whole bag (every activation of
every patch) and runs only where it fits (``--naive-max``). Printed: growth, growth / (N*D*4
bytes), the growth from the smallest to the largest N against N*D*4 bytes, and time per
patch ours/naive measured in the same run. The machine may be shared: compare ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from wsi_mil.config import ModelConfig
    from wsi_mil.features.encoders import create_encoder, preprocess
    from wsi_mil.mil.model import PositionalAttentionMIL
    from wsi_mil.train.chunked import chunked_bag_step, freeze_batchnorm, full_bag_step

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    w = args.width
    enc = create_encoder(feature_dim=args.feature_dim, widths=(w, 2 * w, 4 * w), seed=0).to(dev)
    head = PositionalAttentionMIL(ModelConfig(in_dim=args.feature_dim)).to(dev)
    enc.train()
    freeze_batchnorm(enc)
    amp = torch.bfloat16 if cuda else None
    if cuda:
        enc.to(memory_format=torch.channels_last)
    P = args.patch_px

    def read_chunk(s: int, e: int) -> torch.Tensor:
        # made on the device: on a GPU a one-thread CPU generator, not the step, set the pace
        g = torch.Generator(device=dev).manual_seed(s)
        return torch.randint(0, 256, (e - s, P, P, 3), dtype=torch.uint8, generator=g, device=dev)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return preprocess(x, enc.info, device=dev)

    def step(n: int) -> None:
        xy = torch.rand(n, 2, generator=torch.Generator().manual_seed(1))
        kw = dict(prepare=prepare, seed=0, device=dev, amp_dtype=amp, channels_last=cuda)
        if args.method == "ours":
            chunked_bag_step(enc, head, read_chunk, n, args.chunk_size, xy, 1.0, **kw)
        else:
            full_bag_step(enc, head, read_chunk, n, args.chunk_size, xy, 1.0, **kw)

    setup = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    step(2 * args.chunk_size)  # warm-up: kernels, allocator, .grad tensors exist from here on
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    sec = float("inf")
    for _ in range(args.repeats):  # min over repeats: the machine may be shared
        t0 = time.perf_counter()
        step(args.n)
        if cuda:
            torch.cuda.synchronize()
        sec = min(sec, time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "method": args.method,
        "n": args.n,
        "growth": max(0, peak - base),
        "seconds": sec,
        "warmup": base - setup,
    }


def run_case(args: argparse.Namespace, method: str, n: int) -> dict | None:
    cmd = [
        sys.executable, __file__, "--worker", method, "--n", str(n), "--patch-px", str(args.patch_px),
        "--width", str(args.width), "--feature-dim", str(args.feature_dim), "--chunk-size",
        str(args.chunk_size), "--threads", str(args.threads), "--device", args.device,
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(
            f"  {method} N={n}: failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}",
            file=sys.stderr,
        )
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000,10000,100000", help="bag sizes N (patches)")
    ap.add_argument("--patch-px", type=int, default=32, help="patch side in px (224 = the seed's)")
    ap.add_argument(
        "--width",
        type=int,
        default=16,
        help="encoder stage widths W, 2W, 4W (64 = full resnet-patch-cnn)",
    )
    ap.add_argument("--feature-dim", type=int, default=128, help="D")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument(
        "--naive-max", type=int, default=10000, help="largest N for the naive full-bag step"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 is steadiest on a shared machine)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="steps timed per case (min is reported)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.method = args.worker
        print(json.dumps(worker(args)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    D = args.feature_dim
    full = args.patch_px == 224 and args.width == 64
    mem = (
        "torch.cuda.max_memory_allocated - allocated after setup"
        if args.device.startswith("cuda")
        else "peak RSS (ru_maxrss) - RSS after setup"
    )
    print(f"one training step, {args.device}: {args.patch_px}x{args.patch_px} px patches, resnet-patch-cnn widths "
          f"{args.width}/{2 * args.width}/{4 * args.width}, D={D}, chunk {args.chunk_size}, {args.threads} thread(s)")  # fmt: skip
    if not full:
        print("NOTE: smaller patches and/or a narrower encoder than the seed's 224 px / 64-128-256 (CPU time);"
              " the memory argument does not depend on them: ours grows with N*D only")  # fmt: skip
    print(
        f"patches: in-memory generator (uint8 noise per chunk, made on {args.device}); memory: {mem}; each case in a fresh subprocess"
    )
    print(
        f"{'N':>8} {'method':>6} {'growth MB':>10} {'/(N*D*4)':>9} {'s/step':>8} {'ms/patch':>9} {'warm-up MB':>11}"
    )
    res: dict[tuple[str, int], dict] = {}
    for n in sizes:
        for method in ("ours", "naive"):
            if method == "naive" and n > args.naive_max:
                print(
                    f"{n:>8} {method:>6} {'skipped (> --naive-max ' + str(args.naive_max) + ')':>30}"
                )
                continue
            r = run_case(args, method, n)
            if r is None:
                continue
            res[(method, n)] = r
            nd4 = n * D * 4
            print(
                f"{n:>8} {method:>6} {r['growth'] / 1e6:>10.1f} {r['growth'] / nd4:>9.2f} {r['seconds']:>8.2f} {1e3 * r['seconds'] / n:>9.3f} {r['warmup'] / 1e6:>11.1f}",
                flush=True,
            )

    print()
    lo, hi = min(sizes), max(sizes)
    if ("ours", lo) in res and ("ours", hi) in res:
        grow = res[("ours", hi)]["growth"] - res[("ours", lo)]["growth"]
        nd4 = (hi - lo) * D * 4
        goal = (hi - lo) * D * 4 * 4 + 300e6
        print(f"ours: growth from N={lo} to N={hi}: {grow / 1e6:.1f} MB = {grow / nd4:.2f} x (dN*D*4 bytes = {nd4 / 1e6:.1f} MB); "
              f"goal <= dN*D*16 bytes + 300 MB = {goal / 1e6:.0f} MB: {'MET' if grow <= goal else 'NOT MET'}")  # fmt: skip
    for n in sizes:
        if ("ours", n) in res and ("naive", n) in res:
            o, v = res[("ours", n)], res[("naive", n)]
            ratio = o["seconds"] / v["seconds"]
            print(f"N={n}: time per patch ours/naive = {ratio:.2f} (goal <= 1.5: {'MET' if ratio <= 1.5 else 'NOT MET'}); "
                  f"memory ours/naive = {o['growth'] / max(v['growth'], 1):.3f}; naive {v['growth'] / n / 1e3:.1f} kB/patch"
                  f" -> ~{v['growth'] / n * 1e5 / 1e9:.1f} GB at 100,000 patches")  # fmt: skip


if __name__ == "__main__":
    main()
