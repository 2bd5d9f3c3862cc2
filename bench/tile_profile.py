"""Where `wsi-mil tile`'s time goes on one slide: CPU seconds per thread role, and how much of
the CPUs stayed idle.

Tiles bench/tile.py's synthetic slide (``--size``, written to bench/out/ if missing) with raw
pixels and ``--tissue none`` ``--repeats`` times, as bench/tile.py's "ours" row does, and
prints the median over the runs after the first of:

  wall          seconds of tile_slides()
  CPU           user + system seconds of the process during it
  idle          1 - CPU / (wall x workers): the share of the workers' CPUs left unused
  read          the read pool's threads: JPEG decoding (its own row) + copying tiles into
                patches + the Python around both
  JPEG decode   the time inside the JPEG decoder calls, on the read threads
  write         the store writer's threads: chunk files (O_DIRECT)
  QC            the QC image thread: thumbnail, drawing, PNG
  main          the calling thread: opening the slide, planning, store creation, hand-offs
  other         the rest (zarr's I/O thread, interpreter)

Thread CPU comes from ``time.thread_time()`` when each thread ends; the decoder's share from
timing the backend's JPEG tile decoder (the slide must take the tiff backend's fast path).
The first run is dropped (imports, page cache).

  .venv/bin/python bench/tile_profile.py               # 16,384^2 slide, 2 workers, 7 runs
  .venv/bin/python bench/tile_profile.py --size 32768 --repeats 4
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tile as bench_tile  # noqa: E402  (bench/tile.py: the synthetic slide)

ROLES = {
    "tile-read": "read",
    "store-encode": "write",
    "tile-qc": "QC",
}


def main() -> None:
    from wsi_mil.batch import available_cpus
    from wsi_mil.config import TileConfig
    from wsi_mil.slides import SlideEntry
    from wsi_mil.slides.backends import tiff_backend
    from wsi_mil.tiling import tile_slides

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, default=None, help="default: available_cpus()")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    workers = a.workers or available_cpus()
    bench_tile.OUT.mkdir(parents=True, exist_ok=True)
    slide = bench_tile.write_slide(
        bench_tile.slide_path(a.size, a.quality), a.size, quality=a.quality, workers=workers
    )

    thread_cpu: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    run_thread = threading.Thread.run

    def timed_run(self: threading.Thread) -> None:
        try:
            run_thread(self)
        finally:
            role = ROLES.get(self.name.rsplit("_", 1)[0], "other")
            with lock:
                thread_cpu[role] += time.thread_time()

    decode = tiff_backend.decode_jpeg_tile

    def timed_decode(*args, **kw):  # type: ignore[no-untyped-def]
        t = time.thread_time()
        try:
            return decode(*args, **kw)
        finally:
            with lock:
                thread_cpu["JPEG decode"] += time.thread_time() - t

    threading.Thread.run = timed_run  # type: ignore[method-assign]
    tiff_backend.decode_jpeg_tile = timed_decode

    rows: dict[str, list[float]] = collections.defaultdict(list)
    tmp = Path(tempfile.mkdtemp(prefix="bench_tile_profile_", dir=bench_tile.OUT))
    try:
        for rep in range(a.repeats):
            work = tmp / "w"
            shutil.rmtree(work, ignore_errors=True)
            cfg = TileConfig(
                work=work, patch_size=224, tissue="none", workers=workers, compression="none"
            )
            thread_cpu.clear()
            main0, c0, t0 = time.thread_time(), bench_tile.cpu_s(), time.perf_counter()
            res = tile_slides(cfg, [SlideEntry("bench", slide)], progress=False)
            wall, cpu = time.perf_counter() - t0, bench_tile.cpu_s() - c0
            assert res.exit_code == 0, res.summary()
            thread_cpu["main"] = time.thread_time() - main0
            if rep == 0:
                continue
            rows["wall"].append(wall)
            rows["CPU"].append(cpu)
            rows["idle"].append(1 - cpu / (wall * workers))
            for role in ("read", "JPEG decode", "write", "QC", "main"):
                rows[role].append(thread_cpu[role])
            rows["other"].append(cpu - sum(thread_cpu[r] for r in ("read", "write", "QC", "main")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        threading.Thread.run = run_thread  # type: ignore[method-assign]
        tiff_backend.decode_jpeg_tile = decode

    if not rows["JPEG decode"] or statistics.median(rows["JPEG decode"]) == 0:
        print("note: no JPEG tile went through the tiff backend's decoder (another path)")
    print(
        f"{slide.name}: {a.size}^2 px, {workers} workers, median of {a.repeats - 1} runs "
        "(CPU seconds unless marked)"
    )
    for name, vals in rows.items():
        med = statistics.median(vals)
        if name == "idle":
            print(
                f"  {name:12s} {100 * med:6.1f} %   (range {100 * min(vals):.1f}-{100 * max(vals):.1f})"
            )
        else:
            unit = "s wall" if name == "wall" else "s"
            print(f"  {name:12s} {med:6.3f} {unit:7s}(range {min(vals):.3f}-{max(vals):.3f})")


if __name__ == "__main__":
    main()
