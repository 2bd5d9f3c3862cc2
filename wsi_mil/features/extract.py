"""``wsi-mil extract``: patch stores -> encoder -> feature stores, one HDF5 file per slide.

Patches are decoded ahead of the encoder by background threads (from the store's pixels,
or from the slide for coords-only stores), so decode and I/O overlap compute. Outputs go
to ``W/features/<encoder-tag>/<slide_id>.h5`` under a per-output lock, written to a
temporary name and renamed into place; current outputs are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from wsi_mil import __version__
from wsi_mil.batch import (
    BatchResult,
    Busy,
    Skip,
    SlideWarning,
    atomic_path,
    available_cpus,
    check_output_dir,
    make_output_dir,
    output_lock,
    params_digest,
    remove_stale_tmps,
    run_per_slide,
    shard_items,
)
from wsi_mil.config import ExtractConfig, save_resolved, to_plain
from wsi_mil.errors import ConfigError, StoreError, WsiMilError
from wsi_mil.features.encoders import EncoderInfo, create_encoder, preprocess
from wsi_mil.features.feature_store import FeatureStoreWriter
from wsi_mil.tiling.patch_store import PatchStore

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")


# ---------------------------------------------------------------- config helpers
def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``, ``cuda``, ``cuda:N`` as given.

    ``cuda``/``cuda:N`` without that GPU, or anything that is not a device, is a ConfigError.
    """
    spec = str(spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"--device {spec!r} is not a device", "use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {spec} but no CUDA device is visible",
                "use --device auto or --device cpu",
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(
                f"--device {spec} but only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})",
                "pick a visible GPU or use --device cuda",
            )
    elif dev.type != "cpu":
        raise ConfigError(f"--device {spec!r} is not supported", "use auto, cpu, cuda or cuda:N")
    return dev


def default_workers() -> int:
    """Patch-reading threads: half the CPUs this job may use, 1..8."""
    return max(1, min(8, available_cpus() // 2))


def _encoder_args(cfg: Any) -> tuple[str, int, str | None, int, str]:
    """(name, feature_dim, weights, seed, norm) from an ExtractConfig (or a TrainConfig)."""
    if isinstance(cfg, ExtractConfig):
        seed, norm = cfg.seed, cfg.norm
    else:  # cached training reads features made with extract's defaults for seed and norm
        seed, norm = 0, "bn"
    w = str(cfg.weights) if getattr(cfg, "weights", None) else None
    return cfg.encoder, int(cfg.feature_dim), w, int(seed), norm


@functools.lru_cache(maxsize=8)
def _cached_encoder(
    name: str, feature_dim: int, weights: str | None, mtime: int, seed: int, norm: str
) -> nn.Module:
    return create_encoder(name, feature_dim=feature_dim, weights=weights, seed=seed, norm=norm)


def build_encoder(cfg: Any) -> nn.Module:
    """The encoder a config describes (CPU, eval mode, ``.info``); cached per process."""
    name, dim, w, seed, norm = _encoder_args(cfg)
    mtime = Path(w).stat().st_mtime_ns if w and Path(w).exists() else 0
    return _cached_encoder(name, dim, w, mtime, seed, norm)


def default_features_dir(work: str | os.PathLike, cfg: Any) -> Path:
    """``W/features/<encoder-tag>``: where extract writes (and cached training reads) features.

    ``cfg.features`` wins when set. For a TrainConfig the encoder is built with extract's
    defaults (seed 0, norm bn) unless ``weights`` is given.
    """
    explicit = getattr(cfg, "features", None)
    if explicit:
        return Path(explicit)
    return Path(work) / "features" / build_encoder(cfg).info.tag


def store_digest(store: PatchStore) -> str:
    """Identity of a patch store's content: its attrs + the SHA-256 of its coords."""
    coords_sha = hashlib.sha256(np.ascontiguousarray(store.coords).tobytes()).hexdigest()
    attrs = {k: v for k, v in store.attrs.items() if k not in ("complete",)}
    return params_digest({"attrs": attrs, "coords_sha256": coords_sha, "n": len(store)})


# ---------------------------------------------------------------- patch loading
class PatchBatchLoader:
    """Iterate ``(start, uint8 tensor (n, P, P, 3))`` over a patch store, in order.

    Reads chunk-aligned blocks in ``workers`` background threads (0: synchronous, in the
    caller's thread) and re-cuts them into batches of exactly ``batch_size`` (the last may be
    shorter), so no chunk is decoded twice. Coords-only stores read from the slide, one open
    slide per thread (``slide_opener``). ``pin_memory`` pins batches for fast CUDA copies;
    ``transform`` (e.g. CPU preprocessing) runs on each batch in the background thread too.
    """

    def __init__(
        self,
        store: PatchStore,
        batch_size: int,
        workers: int = 1,
        slide_opener: Callable[[], Any] | None = None,
        pin_memory: bool = False,
        prefetch: int = 2,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        self.store = store
        self.batch_size = int(batch_size)
        self.workers = max(0, int(workers))
        self.pin_memory = pin_memory
        self.transform = transform
        self.prefetch = max(1, prefetch)
        self._opener = slide_opener or store.open_slide
        self._local = threading.local()
        self.block = self._block_size()

    def _block_size(self) -> int:
        if self.store.has_pixels:
            chunk = int(self.store._g["pixels"].chunks[0])  # noqa: SLF001 - format detail we own jointly
            return max(1, -(-self.batch_size // chunk)) * chunk
        return self.batch_size

    def __len__(self) -> int:
        return -(-len(self.store) // self.batch_size)

    def _ranges(self) -> list[tuple[int, int]]:
        n = len(self.store)
        return [(s, min(s + self.block, n)) for s in range(0, n, self.block)]

    def read_block(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, P, P, 3) uint8 patches, from the store's pixels or the slide."""
        try:
            if self.store.has_pixels:
                return self.store.pixels(start, stop)
            slide = getattr(self._local, "slide", None)
            if slide is None:
                slide = self._local.slide = self._opener()
            return self.store.read_patches(start, stop, slide=slide)
        except WsiMilError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged chunks, unreadable slide regions
            raise StoreError(
                f"{self.store.path}: cannot read patches {start}..{stop}: {type(e).__name__}: {e}",
                "the patch store (or its slide) may be damaged: delete the store and re-run 'wsi-mil tile'",
            ) from None

    def _rebatch(
        self, blocks: Iterable[tuple[int, np.ndarray]]
    ) -> Iterator[tuple[int, np.ndarray]]:
        buf: list[np.ndarray] = []
        have, start = 0, 0
        for _, arr in blocks:
            buf.append(arr)
            have += len(arr)
            while have >= self.batch_size:
                batch, buf, have = _take(buf, self.batch_size, have)
                yield start, batch
                start += len(batch)
        if have:
            yield start, np.concatenate(buf) if len(buf) > 1 else buf[0]

    def _blocks_sync(self) -> Iterator[tuple[int, np.ndarray]]:
        for s, e in self._ranges():
            yield s, self.read_block(s, e)

    def _blocks_threaded(self, ex: ThreadPoolExecutor) -> Iterator[tuple[int, np.ndarray]]:
        ranges = iter(self._ranges())
        pending: deque[tuple[int, Future[np.ndarray]]] = deque()
        for s, e in ranges:
            pending.append((s, ex.submit(self.read_block, s, e)))
            if len(pending) > self.workers:
                break
        while pending:
            s, fut = pending.popleft()
            arr = fut.result()
            nxt = next(ranges, None)
            if nxt is not None:
                pending.append((nxt[0], ex.submit(self.read_block, *nxt)))
            yield s, arr

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self.transform is not None:
            t = self.transform(t)
        return t.pin_memory() if self.pin_memory else t

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.workers == 0:
            for s, arr in self._rebatch(self._blocks_sync()):
                yield s, self._tensor(arr)
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def assemble() -> None:
            try:
                with ThreadPoolExecutor(self.workers, thread_name_prefix="wsi-mil-read") as ex:
                    for s, arr in self._rebatch(self._blocks_threaded(ex)):
                        if not put((s, self._tensor(arr))):
                            return
                put(done)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(e)

        th = threading.Thread(target=assemble, name="wsi-mil-batches", daemon=True)
        th.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
            th.join(timeout=30)


def _take(buf: list[np.ndarray], n: int, have: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """First ``n`` rows of the concatenation of ``buf`` (a view when one block suffices)."""
    if len(buf[0]) >= n:
        head, rest = buf[0][:n], buf[0][n:]
        buf = ([rest] if len(rest) else []) + buf[1:]
        return head, buf, have - n
    parts, got = [], 0
    while got < n:
        a = buf.pop(0)
        need = n - got
        parts.append(a[:need])
        got += min(len(a), need)
        if len(a) > need:
            buf.insert(0, a[need:])
    return np.concatenate(parts), buf, have - n


# ---------------------------------------------------------------- one slide
def encode_batches(
    model: nn.Module,
    batches: Iterable[tuple[int, torch.Tensor]],
    device: torch.device,
    info: EncoderInfo | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(start, uint8 (n, P, P, 3) or preprocessed float) -> (start, float32 (n, D)), inference mode.

    CUDA: bf16 autocast; channels_last everywhere (also faster for CPU convolutions).
    """
    info = info or model.info  # type: ignore[union-attr]
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for start, batch in batches:
            if batch.dtype == torch.uint8:
                x = preprocess(batch, info, device=device, memory_format=torch.channels_last)
            else:
                x = batch.to(device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last
                )
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                y = model(x)
            yield start, y.float().cpu().numpy()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode, on ``device``, channels_last weights."""
    return model.eval().to(device=device, memory_format=torch.channels_last)


def feature_attrs(
    store: PatchStore,
    info: EncoderInfo,
    digest: str,
    slide_path: str | os.PathLike | None,
    slide_id: str,
) -> dict[str, Any]:
    """Root attrs of a feature store made from ``store`` with encoder ``info``."""
    w, h = store.level0_size
    return {
        "slide_id": slide_id,
        "encoder": info.name,
        "encoder_tag": info.tag,
        "encoder_weights_sha256": info.weights_sha256,
        "encoder_kwargs": json.dumps(info.kwargs, sort_keys=True, default=str),
        "encoder_trained": bool(info.trained),
        "feature_dim": int(info.out_dim),
        "level0_width": int(w),
        "level0_height": int(h),
        "mpp": store.mpp,
        "downsample": float(store.downsample),
        "level": int(store.level),
        "patch_size": int(store.patch_size),
        "patch_size_level0": int(store.patch_size_level0),
        # absolute: predict and heatmap may run from another folder than extract did
        "slide_path": str(Path(slide_path).resolve()) if slide_path else "",
        "source_store": str(Path(store.path).resolve()),
        "source_digest": digest,
        # only for stores tiled with --significant-bits: heatmaps read the slide with it
        **(
            {"significant_bits": int(bits)} if (bits := store.attrs.get("significant_bits")) else {}
        ),
    }


def extract_store(
    store: PatchStore,
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    batch_size: int = 64,
    workers: int = 1,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    slide_opener: Callable[[], Any] | None = None,
    slide_path: str | os.PathLike | None = None,
    slide_id: str | None = None,
    progress: bool = False,
) -> Path:
    """Encode every patch of ``store`` and write ``out_path`` atomically. Returns ``out_path``.

    ``model`` must already be prepared (:func:`prepare_model`) on ``device``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    from tqdm.auto import tqdm

    dev = torch.device(device)
    info: EncoderInfo = model.info  # type: ignore[assignment]
    sid = slide_id or Path(store.path).name.removesuffix(".zarr")
    n = len(store)
    attrs = feature_attrs(store, info, store_digest(store), slide_path or store.slide_path, sid)
    attrs["dtype"] = dtype
    loader = PatchBatchLoader(
        store, batch_size, workers, slide_opener, pin_memory=dev.type == "cuda"
    )
    out = Path(out_path)
    with (
        FeatureStoreWriter(
            out,
            n,
            info.out_dim,
            store.coords,
            attrs,
            patch_size=int(store.attrs.get("patch_size_level", store.patch_size)),
            patch_level=store.level,
            dtype=dtype,
            coords_attrs={"patch_size_level0": store.patch_size_level0},
        ) as w,
        tqdm(total=n, desc=sid, unit="patch", leave=False, disable=not progress) as bar,
    ):
        for start, feats in encode_batches(model, loader, dev, info):
            if not np.isfinite(feats).all():
                raise StoreError(
                    f"{store.path}: encoder produced NaN/inf features at patches {start}..{start + len(feats)}",
                    "check the --weights file",
                )
            w.write(start, feats)
            bar.update(len(feats))
        w.commit()
    return out


def _cpu_preprocess(t: torch.Tensor, info: EncoderInfo) -> torch.Tensor:
    with torch.inference_mode():
        return preprocess(t, info, memory_format=torch.channels_last)


def inspect_existing(final: Path, info: EncoderInfo, digest: str, n: int, dtype: str) -> str:
    """``missing`` | ``current`` | ``stale`` (re-extract). Raises StoreError for a foreign store.

    A store from another encoder tag or with another feature dim is never overwritten silently.
    """
    if not final.exists():
        return "missing"
    try:
        with h5py.File(final, "r") as f:
            tag = f.attrs.get("encoder_tag")
            tag = tag.decode() if isinstance(tag, bytes) else tag
            shape = f["features"].shape if "features" in f else None
            stored_dtype = f["features"].dtype if "features" in f else None
            src = f.attrs.get("source_digest")
            src = src.decode() if isinstance(src, bytes) else src
    except OSError as e:
        log.warning("%s is unreadable (%s); extracting it again", final, e)
        return "stale"
    if not tag:
        raise StoreError(
            f"{final}: not written by 'wsi-mil extract' (no encoder_tag attr)",
            "move it away, or write to another folder with --features",
        )
    if tag != info.tag:
        raise StoreError(
            f"{final}: holds features of encoder {tag}, this run's encoder is {info.tag}",
            "remove the file, or write to the default folder W/features/<tag> (drop --features)",
        )
    if shape is None or len(shape) != 2 or shape[1] != info.out_dim:
        dim = shape[1] if shape is not None and len(shape) == 2 else shape
        raise StoreError(
            f"{final}: feature dim {dim} does not match encoder {info.tag} (dim {info.out_dim})",
            "remove the file (or pass --overwrite) to extract it again",
        )
    if src != digest or shape[0] != n:
        log.info("%s: patch store changed since extraction; extracting again", final.name)
        return "stale"
    if stored_dtype != np.dtype(dtype):
        return "stale"
    return "current"


def write_encoder_json(out_dir: Path, info: EncoderInfo, cfg: ExtractConfig) -> None:
    """``<out_dir>/encoder.json`` (metadata + resolved config) and ``config.yaml``.

    Refuses a folder that already belongs to another encoder tag.
    """
    make_output_dir(out_dir, "--features" if cfg.features else "--work")
    ej = out_dir / "encoder.json"
    if ej.exists():
        try:
            old = json.loads(ej.read_text()).get("encoder", {}).get("tag")
        except (OSError, ValueError):
            old = None
        if old and old != info.tag:
            raise ConfigError(
                f"{out_dir} holds features of encoder {old}, this run's encoder is {info.tag}",
                "choose another --features folder (or drop it to use W/features/<tag>)",
            )
    doc = {"encoder": info.to_dict(), "config": to_plain(cfg), "wsi_mil_version": __version__}
    with atomic_path(ej) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    save_resolved(cfg, out_dir / "config.yaml")


# ---------------------------------------------------------------- batch entry point
def check_patch_stores(entries: Sequence[Any], patches_dir: Path, option: str) -> None:
    """StoreError when no slide of ``entries`` has a patch store in ``patches_dir``: a wrong
    folder or tile not run yet, one error instead of a failure per slide. Decided over all
    slides, not one shard's: whether a shard stops must not depend on how ids fall."""
    if not entries or any((patches_dir / f"{e.slide_id}.zarr").exists() for e in entries):
        return
    what = (
        f"slide {entries[0].slide_id} has no patch store"
        if len(entries) == 1
        else f"none of the {len(entries)} slides has a patch store"
    )
    raise StoreError(
        f"{what} in {patches_dir}",
        f"run 'wsi-mil tile' first, or check the {option} folder",
    )


def extract_slides(
    cfg: ExtractConfig,
    entries: Sequence[Any],
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    debug: bool = False,
) -> BatchResult:
    """Extract features for this shard's slides -> ``BatchResult`` (never exits).

    Reads ``<patches>/<slide_id>.zarr`` (default ``W/patches``), writes
    ``<features>/<slide_id>.h5`` (default ``W/features/<encoder-tag>``). Bad slides are
    logged in ``W/failures.csv`` and skipped.
    """
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.workers is not None and cfg.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg.workers}")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(available_cpus())
    work = Path(cfg.work)
    patches_dir = Path(cfg.patches) if cfg.patches else work / "patches"
    model = build_encoder(cfg)
    info: EncoderInfo = model.info  # type: ignore[assignment]
    check_output_dir(work, "--work")  # W/failures.csv
    check_patch_stores(entries, patches_dir, "--patches" if cfg.patches else "--work")
    if not info.trained:
        log.warning(
            "encoder %s has no --weights: features come from a randomly initialised CNN (seed %s). "
            "That is a baseline, not a pathology encoder; pass --weights encoder.pt "
            "(e.g. from 'wsi-mil train --mode e2e') or --encoder timm:<model> for pretrained features.",
            info.name,
            info.seed,
        )
    out_dir = default_features_dir(work, cfg)
    write_encoder_json(out_dir, info, cfg)
    model = prepare_model(model, device)
    workers = default_workers() if cfg.workers is None else cfg.workers
    mine = shard_items(list(entries), shard, key=lambda e: e.slide_id)
    log.info(
        "extract: %d slides (shard %d/%d) -> %s on %s",
        len(mine),
        shard[0],
        shard[1],
        out_dir,
        device,
    )

    def one(entry: Any) -> None:
        _extract_one(entry, cfg, model, info, patches_dir, out_dir, device, workers, progress)

    return run_per_slide(
        "extract",
        mine,
        one,
        work,
        slide_id=lambda e: e.slide_id,
        slide_path=lambda e: e.path,
        progress=progress,
        debug=debug,
    )


def _extract_one(
    entry: Any,
    cfg: ExtractConfig,
    model: nn.Module,
    info: EncoderInfo,
    patches_dir: Path,
    out_dir: Path,
    device: torch.device,
    workers: int,
    progress: bool,
) -> None:
    sid = entry.slide_id
    store = PatchStore.open(patches_dir / f"{sid}.zarr")
    final = out_dir / f"{sid}.h5"
    with output_lock(final) as held:
        if not held:
            log.info("%s: another process is writing %s; leaving it to that process", sid, final)
            raise Busy(sid)
        digest = store_digest(store)
        if (
            not cfg.overwrite
            and inspect_existing(final, info, digest, len(store), cfg.dtype) == "current"
        ):
            raise Skip(sid)
        remove_stale_tmps(final)
        slide_path = entry.path or store.slide_path
        opener = None
        if not store.has_pixels and len(store):
            opener = _slide_opener(store, slide_path, cfg.backend)
            opener()  # fail early, in this thread, with the slide's own error message
        extract_store(
            store,
            model,
            final,
            batch_size=cfg.batch_size,
            workers=workers,
            device=device,
            dtype=cfg.dtype,
            slide_opener=opener,
            slide_path=slide_path,
            slide_id=sid,
            progress=progress,
        )
    if len(store) == 0:
        raise SlideWarning(
            f"{store.path} has no patches (no tissue found?); wrote an empty feature store"
        )


def _slide_opener(
    store: PatchStore, slide_path: Path | None, backend: str | None
) -> Callable[[], Any]:
    """Opens the store's slide (checked against the store's level-0 size) for coords-only stores."""
    if slide_path is None:
        raise StoreError(
            f"{store.path}: store has no pixels and no slide path",
            "give the slide in --slides, or re-tile with --pixels",
        )

    def open_() -> Any:
        slide = store.open_slide(slide_path, backend=backend)
        if tuple(slide.dimensions) != tuple(store.level0_size):
            raise StoreError(
                f"{slide_path}: level-0 size {slide.dimensions} differs from the patch store's {store.level0_size}",
                f"this is not the slide {store.path} was tiled from: fix the path or re-tile",
            )
        return slide

    return open_
