"""Tiling many small images: one process (slides one after another, threads within each)
against --processes P (P slides at once, each in its own worker process), in one run.

Small images (cell imaging, TMA cores, the demo's 1024^2 slides) spend most of their
per-slide time in serial steps (thumbnail, tissue mask, store creation, QC image), which a
read pool cannot spread over the CPUs; whole slides in separate processes can. Both runs
write the same stores (checked). Best of --repeats alternating runs.

    .venv/bin/python bench/tile_many.py                  # 200 slides of 1024^2, P = the CPUs
    .venv/bin/python bench/tile_many.py --n 64 --size 2048 --processes 4
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    from wsi_mil.batch import available_cpus
    from wsi_mil.config import TileConfig
    from wsi_mil.slides import read_slide_table
    from wsi_mil.synth import SynthConfig, generate
    from wsi_mil.tiling import PatchStore, tile_slides

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="slides")
    ap.add_argument("--size", type=int, default=1024, help="slide side, level-0 px")
    ap.add_argument("--processes", type=int, default=None, help="default: the CPUs")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    cpus = available_cpus()
    procs = a.processes or cpus
    OUT.mkdir(parents=True, exist_ok=True)
    slides = OUT / f"tile_many_{a.n}x{a.size}"
    if not (slides / "slides.csv").exists():
        generate(SynthConfig(out=slides, n_slides=a.n, width_px=a.size, height_px=a.size))
    entries = read_slide_table(slides / "slides.csv")
    tmp = Path(tempfile.mkdtemp(prefix="tile_many_", dir=OUT))
    times: dict[int, list[float]] = {1: [], procs: []}
    try:
        for _ in range(a.repeats):
            for p in (1, procs):
                work = tmp / f"p{p}"
                shutil.rmtree(work, ignore_errors=True)
                cfg = TileConfig(work=work, patch_size=64, level=1, processes=p)
                t0 = time.perf_counter()
                res = tile_slides(cfg, entries, progress=False)
                times[p].append(time.perf_counter() - t0)
                assert res.exit_code == 0, res.summary()
        for e in entries[:: max(1, len(entries) // 10)]:
            s1 = PatchStore.open(tmp / "p1" / "patches" / f"{e.slide_id}.zarr")
            sp = PatchStore.open(tmp / f"p{procs}" / "patches" / f"{e.slide_id}.zarr")
            assert np.array_equal(s1.coords, sp.coords)
            assert np.array_equal(s1.pixels(0, len(s1)), sp.pixels(0, len(sp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t1, tp = min(times[1]), min(times[procs])
    print(
        f"{a.n} slides of {a.size}^2 px, 64 px patches at level 1, {cpus} CPUs, best of {a.repeats}"
    )
    print(f"one process ({cpus} read threads):       {t1:7.1f} s  {a.n / t1:6.1f} slides/s")
    per = max(1, cpus // procs)
    print(f"--processes {procs} ({per} read thread(s) each): {tp:7.1f} s  {a.n / tp:6.1f} slides/s")
    print(f"speed-up: {t1 / tp:.2f}x (same stores)")


if __name__ == "__main__":
    main()
