"""Reader speed: our tifffile backend vs OpenSlide on one JPEG-tiled pyramidal TIFF.

Prints RATIOS measured in one run (the machine is shared, absolute times are noisy):
  - random 224x224 read_region at level 0 (the per-patch slow path),
  - a sweep of tile-aligned 1024x1024 windows over level 0 (how tiling should read),
  - thumbnail(1024).
Also checks both backends return identical pixels for every window read.

    .venv/bin/python bench/slide_readers.py [--size 8192] [--n 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from slide_factory import make_pyramidal_tiff, test_image  # noqa: E402

from wsi_mil.slides import open_slide  # noqa: E402


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="level-0 width = height in px")
    ap.add_argument("--n", type=int, default=300, help="random patches per backend")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tile = test_image(1024, 1024, seed=1)
        img = np.tile(tile, (a.size // 1024, a.size // 1024, 1))
        p = make_pyramidal_tiff(
            Path(d) / "bench.tif", img, n_levels=4, tile_px=256, compression="jpeg"
        )
        del img
        rng = np.random.default_rng(0)
        xy = rng.integers(0, a.size - 224, (a.n, 2))
        res: dict[str, dict[str, float]] = {}
        outs: dict[str, list[np.ndarray]] = {}
        for name in ("tiff", "openslide"):
            # a fresh slide per repeat, so no backend profits from a warm tile cache
            def patches(name=name):
                with open_slide(p, backend=name) as s:
                    for x, y in xy:
                        s.read_region(0, int(x), int(y), 224, 224)

            def windows(name=name, keep=False):
                got = []
                with open_slide(p, backend=name) as s:
                    for y in range(0, a.size, 1024):
                        for x in range(0, a.size, 1024):
                            r = s.read_level_region(0, x, y, 1024, 1024)
                            if keep and len(got) < 8:
                                got.append(r)
                return got

            def thumb(name=name):
                with open_slide(p, backend=name) as s:
                    s.thumbnail(1024)

            res[name] = {
                "patches": _time(patches),
                "windows": _time(windows),
                "thumbnail": _time(thumb),
            }
            outs[name] = windows(keep=True)
        same = all(
            np.array_equal(u, v) for u, v in zip(outs["tiff"], outs["openslide"], strict=True)
        )
        mp = a.size * a.size / 1e6
        print(f"slide {a.size}x{a.size} JPEG q90, 256 px tiles; identical window pixels: {same}")
        for k in ("patches", "windows", "thumbnail"):
            t, o = res["tiff"][k], res["openslide"][k]
            extra = (
                f"  (tiff {mp / t:.0f} MP/s, openslide {mp / o:.0f} MP/s)" if k == "windows" else ""
            )
            print(f"{k:>10}: openslide time / tiff time = {o / t:.2f}{extra}")


if __name__ == "__main__":
    main()
