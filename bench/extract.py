"""Extraction throughput: encoder alone vs the full pipeline, on the same patches, in one run.

Prints (the machine is shared, so RATIOS measured in one run are what counts):
  - encoder-only throughput: forward passes over preprocessed tensors already in memory;
  - full extraction throughput from a patch store: decode + I/O + preprocess + encoder +
    HDF5 write (extract_store, background reader threads);
  - the same full pipeline with workers=0 (decode in the main thread, no overlap);
  - the reader alone (PatchBatchLoader with the same threads, pinned batches on CUDA): the
    rate the store can feed an encoder at; once reading chunk files directly (PatchStore's
    default) and once through zarr's own read path (what PatchStore did before).
  - ratio full / encoder-only (>= 0.9 means decode and I/O are hidden behind compute).
Each timing is the best of --repeat alternating runs.

    .venv/bin/python bench/extract.py [--n 768] [--patch-px 224] [--batch-size 64] [--device auto]
                                      [--compression none|zstd|lz4]  (default: tile's default)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from slide_factory import test_image  # noqa: E402

from wsi_mil.batch import available_cpus  # noqa: E402
from wsi_mil.config import TileConfig  # noqa: E402
from wsi_mil.features import (  # noqa: E402
    PatchBatchLoader,
    create_encoder,
    extract_store,
    prepare_model,
    preprocess,
    resolve_device,
)
from wsi_mil.tiling.patch_store import PatchStore, PatchStoreWriter  # noqa: E402


def make_store(path: Path, n: int, patch_px: int, chunk: int, compression: str) -> PatchStore:
    """A pixel store of ``n`` patches cut from a structured test image."""
    side = int(np.ceil(np.sqrt(n)))
    # test_image's cost grows with the square of its area: cut the patches from an image of
    # at most 8 x 8 patches, cycling (same pixel statistics, so the same decode cost)
    img_side = min(side, 8)
    img = test_image(img_side * patch_px, img_side * patch_px, seed=3)
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * patch_px
    src = xy % (img_side * patch_px)
    attrs = {
        "level": 0,
        "downsample": 1.0,
        "patch_size": patch_px,
        "level0_width": side * patch_px,
        "level0_height": side * patch_px,
        "mpp": 0.5,
        "slide_path": "",
    }
    with PatchStoreWriter(path, xy, attrs, chunk_patches=chunk, compressors=compression) as w:
        for s in range(0, n, chunk):
            w.write_pixels(
                s,
                np.stack([img[y : y + patch_px, x : x + patch_px] for x, y in src[s : s + chunk]]),
            )
        w.commit()
    return PatchStore.open(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n", type=int, default=768, help="patches (12 batches: a real slide has thousands)"
    )
    ap.add_argument("--patch-px", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="reader threads of the full pipeline")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--compression",
        default=TileConfig.compression,
        choices=["none", "zstd", "lz4"],
        help="pixel compression of the store read (default: wsi-mil tile's)",
    )
    a = ap.parse_args()
    device = resolve_device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(available_cpus())
    model = prepare_model(create_encoder(), device)
    info = model.info
    cuda = device.type == "cuda"

    with tempfile.TemporaryDirectory() as d:
        store = make_store(Path(d) / "bench.zarr", a.n, a.patch_px, 64, a.compression)
        pix = store.pixels(0, a.n)
        tensors = [
            preprocess(pix[s : s + a.batch_size], info, device=device).contiguous(
                memory_format=torch.channels_last
            )
            for s in range(0, a.n, a.batch_size)
        ]

        def encoder_only() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                for x in tensors:
                    model(x).float().cpu()  # same device->host copy as the pipeline

        def full(workers: int) -> None:
            extract_store(
                store,
                model,
                Path(d) / "out.h5",
                batch_size=a.batch_size,
                workers=workers,
                device=device,
            )

        via_zarr = PatchStore.open(store.path)
        via_zarr._chunk_reader = None  # noqa: SLF001 - the zarr read path, for comparison

        def reader_only(st: PatchStore) -> None:
            for _ in PatchBatchLoader(st, a.batch_size, a.workers, pin_memory=cuda):
                pass

        encoder_only()  # warm-up (kernel selection, allocator)
        t_enc, t_full, t_sync, t_read, t_zarr = [], [], [], [], []
        for _ in range(a.repeat):
            for fn, acc in (
                (encoder_only, t_enc),
                (lambda: full(a.workers), t_full),
                (lambda: full(0), t_sync),
                (lambda: reader_only(store), t_read),
                (lambda: reader_only(via_zarr), t_zarr),
            ):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                acc.append(time.perf_counter() - t)
        enc, ful, syn = a.n / min(t_enc), a.n / min(t_full), a.n / min(t_sync)
        rd, rz = a.n / min(t_read), a.n / min(t_zarr)
        dev_name = (
            torch.cuda.get_device_name(device)
            if cuda
            else f"cpu x{torch.get_num_threads()} threads"
        )
        print(
            f"device: {dev_name}; {a.n} patches of {a.patch_px}px ({a.compression} store), "
            f"batch {a.batch_size}, encoder {info.tag}, best of {a.repeat}"
        )
        print(f"encoder only (tensors in memory):            {enc:9.1f} patches/s")
        print(f"full extraction, {a.workers} reader thread(s):       {ful:9.1f} patches/s")
        print(f"full extraction, workers=0 (no overlap):      {syn:9.1f} patches/s")
        print(f"reader alone, {a.workers} thread(s):                {rd:9.1f} patches/s")
        print(
            f"reader alone through zarr, {a.workers} thread(s):   {rz:9.1f} patches/s   (direct / zarr: {rd / rz:.2f}x)"
        )
        print(
            f"ratio full / encoder-only: {ful / enc:.3f}  (target >= 0.9)   no-overlap ratio: {syn / enc:.3f}"
        )


if __name__ == "__main__":
    main()
