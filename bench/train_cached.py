"""Benchmark: time per epoch of cached MIL training, and how it scales with bag size.

For each bag size it times, on the same in-memory bags (D = --dim, float32, with coords):

  head      minimal loop: zero_grad, forward, BCE, backward, AdamW step per bag (baseline)
  epoch     wsi_mil's Trainer.train_epoch (seeded order, step groups, loss bookkeeping)
  seed      the seed's style: per bag, patches through the head in chunks of 64 in a python
            loop, then concatenated and aggregated (same maths)
  load      (--stores) reading the bags once from real HDF5 feature stores via load_bags

and prints seconds per epoch with the ratios epoch/head and seed/epoch, measured in this run.

    .venv/bin/python bench/train_cached.py                     # 200 bags x 1k, 5k, 20k patches
    .venv/bin/python bench/train_cached.py --n-bags 50 --sizes 1000,20000 --stores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_mil.batch import available_cpus
from wsi_mil.config import ModelConfig, TrainConfig
from wsi_mil.mil.bags import Bag, load_bags
from wsi_mil.mil.model import PositionalAttentionMIL
from wsi_mil.train.distributed import DistInfo
from wsi_mil.train.loop import Trainer


def make_bags(n_bags: int, n: int, dim: int, seed: int = 0) -> list[Bag]:
    g = torch.Generator().manual_seed(seed)
    return [
        Bag(
            f"b{i}", i % 2, "train", torch.randn(n, dim, generator=g), torch.rand(n, 2, generator=g)
        )
        for i in range(n_bags)
    ]


def time_head(model: torch.nn.Module, bags: list[Bag], device: torch.device) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    for b in bags:
        opt.zero_grad(set_to_none=True)
        out = model(b.features.to(device), b.norm_coords.to(device))
        loss_fn(out.logit, torch.tensor(float(b.label), device=device)).backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


def seed_style_forward(
    model: PositionalAttentionMIL, f: torch.Tensor, xy: torch.Tensor, chunk: int = 64
):
    """The seed's structure: embed + score patches chunk by chunk in python, then aggregate."""
    hs, scores = [], []
    for s in range(0, len(f), chunk):
        h = model.embed(f[s : s + chunk], xy[s : s + chunk])
        hs.append(h)
        scores.append(model.attention_logits(h))
    h, a = torch.cat(hs), torch.softmax(torch.cat(scores), 0)
    return model.classifier(a @ h).squeeze(-1)


def time_seed(model: PositionalAttentionMIL, bags: list[Bag], device: torch.device) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    for b in bags:
        opt.zero_grad(set_to_none=True)
        logit = seed_style_forward(model, b.features.to(device), b.norm_coords.to(device))
        loss_fn(logit, torch.tensor(float(b.label), device=device)).backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


def time_epoch(cfg: TrainConfig, bags: list[Bag], device: torch.device, epoch: int) -> float:
    trainer = Trainer(
        cfg,
        PositionalAttentionMIL(ModelConfig(in_dim=bags[0].dim)),
        bags,
        [],
        "unused",
        DistInfo(device=device),
        progress=False,
    )
    trainer.setup()
    t0 = time.perf_counter()
    trainer.train_epoch(epoch)
    _sync(device)
    return time.perf_counter() - t0


def time_load(bags: list[Bag]) -> float:
    from wsi_mil.features.feature_store import write_features
    from wsi_mil.slides.table import SlideEntry

    with tempfile.TemporaryDirectory() as d:
        for b in bags:
            coords = (b.norm_coords.numpy() * 100_000).astype(np.int64)
            write_features(
                Path(d) / f"{b.slide_id}.h5",
                b.features.numpy(),
                coords,
                {"level0_width": 100_000, "level0_height": 100_000},
                256,
                0,
            )
        entries = [SlideEntry(b.slide_id, None, b.label) for b in bags]
        t0 = time.perf_counter()
        load_bags(entries, d, progress=False)
        return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-bags", type=int, default=200)
    ap.add_argument("--sizes", default="1000,5000,20000", help="patches per bag, comma separated")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="timed epochs per variant (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: available CPUs)"
    )
    ap.add_argument(
        "--stores", action="store_true", help="also time loading the bags from real HDF5 stores"
    )
    ap.add_argument("--no-seed", action="store_true", help="skip the seed-style baseline")
    args = ap.parse_args()

    torch.set_num_threads(args.threads or available_cpus())
    device = torch.device(args.device)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, D={args.dim}, {args.n_bags} bags"
    )
    head = f"{'patches/bag':>11} {'head s':>8} {'epoch s':>8} {'epoch/head':>10} {'seed s':>8} {'seed/epoch':>10} {'Mpatch/s':>9}"
    head += f" {'load s':>7}" if args.stores else ""
    print(head)
    cfg = TrainConfig(epochs=1, device=str(device), early_stop="none")
    for n in (int(s) for s in args.sizes.split(",")):
        bags = make_bags(args.n_bags, n, args.dim)
        torch.manual_seed(0)
        model = PositionalAttentionMIL(ModelConfig(in_dim=args.dim)).to(device)
        time_head(model, bags[:3], device)  # warm-up
        th = statistics.median(time_head(model, bags, device) for _ in range(args.repeats))
        te = statistics.median(time_epoch(cfg, bags, device, r) for r in range(args.repeats))
        ts = (
            float("nan")
            if args.no_seed
            else statistics.median(time_seed(model, bags, device) for _ in range(args.repeats))
        )
        row = f"{n:>11} {th:>8.2f} {te:>8.2f} {te / th:>10.2f} {ts:>8.2f} {ts / te:>10.2f} {args.n_bags * n / te / 1e6:>9.2f}"
        if args.stores:
            row += f" {time_load(bags):>7.2f}"
        print(row, flush=True)
        del bags


if __name__ == "__main__":
    main()
