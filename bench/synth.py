"""Benchmark `wsi-mil synth`: a >= 70,000^2 px pyramidal TIFF written tile by tile.

Each measurement runs in its own child process, which reports its own peak RSS
(getrusage maxrss) and wall time, so the numbers do not contaminate each other:

  streamed (ours)   generate() at --size (default 71,680^2: 320^2 = 102,400 patches of 224^2)
  streamed (ours)   the same at --small-size
  render only       every tile of every level rendered, nothing encoded or written (--small-size)
  in-memory numpy   level 0 rendered into one array, levels by 2x2 means, tifffile writes the
                    arrays (--small-size); its RSS is extrapolated to --size by pixel count

The machine is shared, so compare the ratios printed at the end, not absolute MP/s.

  .venv/bin/python bench/synth.py                      # full size (several minutes)
  .venv/bin/python bench/synth.py --size 8192 --small-size 4096   # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_LIMIT_MB = 2048


def _child(kind: str, size: int, out: Path, tile_px: int) -> dict:
    import numpy as np

    from wsi_mil.synth import SynthConfig, build_specs, generate, resolve_config
    from wsi_mil.synth.writers import level_shapes, single_threaded_blas

    single_threaded_blas().__enter__()  # as generate() does, for every approach alike

    cfg = SynthConfig(
        out=out, n_slides=1, width_px=size, height_px=size, positive_fraction=1.0, tile_px=tile_px
    )
    t0 = time.perf_counter()
    if kind == "streamed":
        generate(cfg)
    elif kind == "render-only":
        from concurrent.futures import ThreadPoolExecutor

        from wsi_mil.batch import available_cpus
        from wsi_mil.synth.writers import iter_tiles

        spec = build_specs(resolve_config(cfg))[0]
        workers = available_cpus()
        with ThreadPoolExecutor(workers) as pool:
            for d, lw, lh in level_shapes(size, size, tile_px):
                for _ in iter_tiles(spec, d, lw, lh, tile_px, pool, workers, None):
                    pass
    elif kind == "in-memory":
        import tifffile

        from wsi_mil.synth.render import render_region

        spec = build_specs(resolve_config(cfg))[0]
        img = render_region(spec, 0, 0, size, size, 1)
        out.mkdir(parents=True, exist_ok=True)
        with tifffile.TiffWriter(out / "inmem.tiff", bigtiff=True) as tw:
            level = img
            for k in range(len(level_shapes(size, size, tile_px))):
                tw.write(
                    level,
                    tile=(tile_px, tile_px),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": 90},
                    subfiletype=1 if k else 0,
                    metadata=None,
                    maxworkers=2,
                )
                h, w = (level.shape[0] // 2) * 2, (level.shape[1] // 2) * 2
                level = (
                    level[:h, :w]
                    .reshape(h // 2, 2, w // 2, 2, 3)
                    .mean((1, 3))
                    .round()
                    .astype(np.uint8)
                )
    else:
        raise SystemExit(f"unknown kind {kind}")
    wall = time.perf_counter() - t0
    size_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    return {
        "kind": kind,
        "size": size,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output_mb": size_bytes / 2**20,
    }


def _run(kind: str, size: int, tile_px: int, root: Path) -> dict:
    out = root / f"{kind}-{size}"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--size",
        str(size),
        "--tile-px",
        str(tile_px),
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{kind} at {size} failed:\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size", type=int, default=71_680, help="side of the big slide in px (default 71,680)"
    )
    ap.add_argument("--small-size", type=int, default=8192, help="side for the baselines in px")
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the outputs (deleted after)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.size, a.out, a.tile_px)))
        return

    root = Path(tempfile.mkdtemp(prefix="wsi-mil-bench-synth-", dir=a.tmp))
    try:
        rows = [
            ("streamed (ours)", _run("streamed", a.size, a.tile_px, root)),
            ("streamed (ours)", _run("streamed", a.small_size, a.tile_px, root)),
            ("render only", _run("render-only", a.small_size, a.tile_px, root)),
            ("in-memory numpy", _run("in-memory", a.small_size, a.tile_px, root)),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    patches = (a.size // 224) ** 2
    print(
        f"\nwsi-mil synth benchmark: tissue background, JPEG q90 tiles of {a.tile_px} px, all pyramid levels"
    )
    print(
        f"big slide: {a.size:,} x {a.size:,} px = {a.size**2 / 1e6:,.0f} MP level 0, {patches:,} patches of 224^2\n"
    )
    print(
        f"{'approach':<18}{'side px':>9}{'MP (lvl 0)':>12}{'wall s':>9}{'MP/s':>8}{'peak RSS MB':>13}{'file MB':>9}"
    )
    for name, r in rows:
        mp = r["size"] ** 2 / 1e6
        out_mb = f"{r['output_mb']:9.0f}" if r["kind"] != "render-only" else f"{'-':>9}"
        print(
            f"{name:<18}{r['size']:>9,}{mp:>12,.0f}{r['wall_s']:>9.1f}{mp / r['wall_s']:>8.1f}{r['peak_rss_mb']:>13.0f}{out_mb}"
        )
    big, small, render, inmem = (r for _, r in rows)

    def mps(r: dict) -> float:
        return r["size"] ** 2 / 1e6 / r["wall_s"]

    inmem_rss_big = inmem["peak_rss_mb"] * (a.size / inmem["size"]) ** 2
    print()
    print(
        f"ratio streamed@{a.size:,} / render-only@{a.small_size:,} MP/s: {mps(big) / mps(render):.2f} (encoding + writing overhead)"
    )
    print(
        f"ratio streamed / in-memory MP/s at {a.small_size:,}:        {mps(small) / mps(inmem):.2f}"
    )
    print(
        f"in-memory peak RSS extrapolated to {a.size:,}^2: {inmem_rss_big / 1024:,.1f} GB vs streamed {big['peak_rss_mb'] / 1024:.2f} GB"
    )
    ok = big["peak_rss_mb"] < RSS_LIMIT_MB
    print(
        f"peak RSS of the streamed {a.size:,}^2 write: {big['peak_rss_mb']:.0f} MB -> {'OK' if ok else 'OVER'} (limit {RSS_LIMIT_MB} MB)"
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
