"""Patch store: ``W/patches/<slide_id>.zarr`` (zarr v3 group) — *contract* format.

Arrays: ``coords`` int64 (N, 2) level-0 (x, y) top-left; optional ``pixels`` uint8
(N, P, P, 3) chunked by patches; optional ``tissue`` float32 (N,).
Attrs: ``slide_path``, ``slide_fingerprint``, ``level``, ``downsample`` (level-0 px
per output px), ``patch_size`` (output px), ``patch_size_level`` (px read at
``level``), ``stride``, ``mpp`` (level 0, may be null), ``level0_width``,
``level0_height``, tiling parameters, ``wsi_mil_version`` and ``complete: true``
written last. A store is written under a temporary name and renamed into place,
so a killed run never leaves a store that looks complete.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_mil import __version__
from wsi_mil.batch import atomic_path
from wsi_mil.config import TileConfig
from wsi_mil.errors import StoreError

REQUIRED_ATTRS = ("level", "downsample", "patch_size", "level0_width", "level0_height")

#: pixel compressions by name, all lossless. Measured by bench/tile.py (JPEG-tiled synthetic
#: H&E, 2 CPUs; decoded JPEG texture compresses poorly, glass much better): ``none``
#: (default): raw, fastest to write and read; ``zstd`` (level 1): 1.19x smaller than raw,
#: ~45 % more tiling CPU; ``lz4`` (blosc): 1.02x, ~15-20 % more CPU.
COMPRESSIONS = ("none", "zstd", "lz4")
ZSTD_LEVEL = 1


def pixel_compressors(name: str) -> list[Any]:
    """zarr v3 codecs for the ``pixels`` array of compression ``name`` (see COMPRESSIONS)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return [ZstdCodec(level=ZSTD_LEVEL)]
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1)]
    if name == "none":
        return []
    raise StoreError(
        f"unknown pixel compression {name!r}", f"choose one of {', '.join(COMPRESSIONS)}"
    )


_scratch = threading.local()

#: chunk files are written with O_DIRECT (when the buffer is page-aligned and the filesystem
#: allows it): the bytes go from our reused buffers to the disk without a page-cache copy.
#: Tiling writes GBs per slide that nothing reads back soon, so caching them only evicts
#: useful pages and costs a copy (on VMs whose fresh pages fault in slowly, as much CPU as
#: the JPEG decoding). The tail past the last IO_ALIGN boundary is written buffered.
#: Filesystems that refuse O_DIRECT get buffered writes; WSI_MIL_DIRECT_IO=0 turns it off.
DIRECT_IO = hasattr(os, "O_DIRECT") and os.environ.get("WSI_MIL_DIRECT_IO", "1") != "0"
#: alignment of O_DIRECT buffers, lengths and offsets (the page size, e.g. 64 KiB on some ARM)
IO_ALIGN = max(4096, mmap.PAGESIZE)


#: buffers at least this large ask for transparent huge pages (2 MiB on x86-64);
#: WSI_MIL_HUGE_PAGES=0 turns that off (e.g. where compaction stalls on a fragmented node)
HUGE_PAGE_MIN_BYTES = 2 << 20
HUGE_PAGES = os.environ.get("WSI_MIL_HUGE_PAGES", "1") != "0"


def anonymous_pages(nbytes: int) -> np.ndarray:
    """New uint8 (nbytes,) array of private anonymous memory, page-aligned (zero-filled, as
    fresh pages are).

    Private, not ``mmap.mmap(-1, n)``'s default MAP_SHARED: shared anonymous memory is shmem,
    which faults in page by page and gets no huge pages (shmem_enabled is "never" on most
    kernels). Buffers of several MiB are advised huge pages: a 9.6 MB chunk buffer then
    faults in ~5 times instead of ~2,400, which made tiling a slide 6-9 % faster on the
    2-core CI VM (bench/tile.py).
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    m = mmap.mmap(-1, max(nbytes, 1), flags=flags) if flags else mmap.mmap(-1, max(nbytes, 1))
    if HUGE_PAGES and nbytes >= HUGE_PAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # THP not built in: ordinary pages
            m.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(m, np.uint8, count=nbytes)


def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """uint8 array of ``shape`` (contents unspecified) whose first byte is page-aligned (for
    O_DIRECT)."""
    return anonymous_pages(int(np.prod(shape))).reshape(shape)


def _scratch_buffer(nbytes: int) -> np.ndarray:
    """Per-thread reusable page-aligned uint8 buffer of at least ``nbytes``."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _scratch.buf = aligned_empty((nbytes,))
    return buf


def encode_chunk(block: np.ndarray, compression: str) -> np.ndarray:
    """Bytes (uint8 1-D) of one ``pixels`` chunk file, as zarr's codecs of ``compression`` write them.

    ``block``: C-contiguous uint8 chunk. The result may be a view of a per-thread buffer that
    the next call on the same thread overwrites (encoding into fresh memory for every chunk
    costs page faults, which on some VMs cost more than the compression itself); it starts
    page-aligned unless it is ``block`` itself.
    """
    import imagecodecs

    raw = block.reshape(-1)
    if compression == "none":
        return raw
    buf = _scratch_buffer(raw.nbytes + raw.nbytes // 128 + (1 << 16))  # >= zstd/blosc bound
    if compression == "zstd":
        out = imagecodecs.zstd_encode(raw, level=ZSTD_LEVEL, out=buf)
    elif compression == "lz4":
        out = imagecodecs.blosc_encode(
            raw, level=5, compressor="lz4", shuffle=0, typesize=1, numthreads=1, out=buf
        )
    else:
        pixel_compressors(compression)  # raises the StoreError for unknown names
        raise AssertionError(compression)
    return np.frombuffer(out, np.uint8)


def write_new_file(path: str | os.PathLike, data: np.ndarray) -> None:
    """Write uint8 ``data`` as the new file ``path``, with O_DIRECT where possible (see DIRECT_IO)."""
    import errno

    mv = memoryview(np.ascontiguousarray(data).reshape(-1))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = DIRECT_IO and len(mv) >= IO_ALIGN and data.ctypes.data % IO_ALIGN == 0
    fd = -1
    if direct:
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as e:  # e.g. tmpfs: no O_DIRECT
            if e.errno != errno.EINVAL:
                raise
            direct = False
    if fd < 0:
        fd = os.open(path, flags, 0o644)
    try:
        pos = 0
        if direct:
            head = len(mv) // IO_ALIGN * IO_ALIGN
            try:
                while pos < head:
                    pos += os.write(fd, mv[pos:head])
                    if pos % IO_ALIGN:  # a short unaligned write: finish buffered
                        break
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: direct writes refused after all
                    raise
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        while pos < len(mv):
            pos += os.write(fd, mv[pos:])
    finally:
        os.close(fd)


class ChunkFileReader:
    """Reads the ``pixels`` chunk files of a local zarr v3 array directly: file -> decoder ->
    the caller's array, with no zarr machinery in between.

    zarr v3 funnels every read through one event-loop thread, so reader threads queue behind
    each other: 8 threads on a 16-core GPU node read 14,000 patches/s of a zstd store through
    zarr and 27,000 directly (``bench/extract.py``).
    This handles the layouts tiling writes (regular chunks of whole patches; codecs
    ``bytes`` alone, or followed by ``zstd`` or ``blosc``; either chunk-key separator) and
    gives the same arrays as zarr; :meth:`for_array` returns None for anything else, which
    then goes through zarr. A missing chunk file holds the fill value, as in zarr.
    """

    def __init__(
        self, folder: Path, shape: tuple[int, ...], chunk: int, sep: str, codec: str, fill: int
    ) -> None:
        self.folder, self.shape, self.chunk, self.sep = folder, shape, chunk, sep
        self.codec, self.fill = codec, fill
        self.chunk_nbytes = chunk * int(np.prod(shape[1:]))

    @classmethod
    def for_array(cls, folder: Path) -> ChunkFileReader | None:
        """Reader of the zarr v3 array in ``folder``, or None if its layout is not one we read."""
        import json

        try:
            meta = json.loads((folder / "zarr.json").read_text())
            shape = tuple(int(v) for v in meta["shape"])
            grid = meta["chunk_grid"]
            chunks = [int(v) for v in grid["configuration"]["chunk_shape"]]
            key = meta["chunk_key_encoding"]
            sep = key.get("configuration", {}).get("separator", "/")
            codecs = meta["codecs"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        names = [c.get("name") for c in codecs] if isinstance(codecs, list) else []
        if not (
            meta.get("zarr_format") == 3
            and meta.get("node_type") == "array"
            and meta.get("data_type") == "uint8"
            and grid.get("name") == "regular"
            and key.get("name") == "default"
            and sep in ("/", ".")
            and len(shape) == len(chunks) >= 1
            and chunks[0] >= 1
            and list(chunks[1:]) == list(shape[1:])  # chunks of whole patches
            and not meta.get("storage_transformers")
            and names[:1] == ["bytes"]
            and names[1:] in ([], ["zstd"], ["blosc"])
            and isinstance(meta.get("fill_value"), int)
        ):
            return None
        codec = names[1] if len(names) > 1 else "none"
        return cls(folder, shape, chunks[0], sep, codec, int(meta["fill_value"]))

    def chunk_path(self, index: int) -> Path:
        """File of chunk ``index`` (along the first axis)."""
        key = self.sep.join(["c", str(index)] + ["0"] * (len(self.shape) - 1))
        return self.folder / key

    def read_into(self, index: int, out: np.ndarray) -> None:
        """Decode chunk ``index`` (all ``chunk`` rows, padding included) into C-contiguous uint8
        ``out`` of ``chunk_nbytes`` bytes."""
        path = self.chunk_path(index)
        flat = out.reshape(-1)
        try:
            with open(path, "rb", buffering=0) as f:
                if self.codec == "none":
                    n = f.readinto(memoryview(flat))
                    if n != self.chunk_nbytes or f.read(1):
                        raise ValueError(f"{n} bytes instead of {self.chunk_nbytes}")
                    return
                data = f.read()
        except FileNotFoundError:  # never written: all fill value (zarr's rule)
            flat.fill(self.fill)
            return
        except (ValueError, OSError) as e:  # short/long file, a directory, EIO, permissions
            raise StoreError(f"{path}: damaged chunk ({e})", _REBUILD) from None
        import imagecodecs

        try:
            if self.codec == "zstd":
                got = imagecodecs.zstd_decode(data, out=flat)
            else:
                # c-blosc trusts its header's sizes: check them before it reads past the data
                head = np.frombuffer(data[:16], "<u4") if len(data) >= 16 else None
                if head is None or head[3] != len(data) or head[1] != self.chunk_nbytes:
                    raise ValueError(f"blosc header does not match the {len(data)}-byte file")
                got = imagecodecs.blosc_decode(data, out=flat)
            if len(got) != self.chunk_nbytes:
                raise ValueError(f"{len(got)} bytes instead of {self.chunk_nbytes}")
        except Exception as e:  # noqa: BLE001 - any decoder failure means a damaged file
            raise StoreError(f"{path}: damaged chunk ({type(e).__name__}: {e})", _REBUILD) from None

    def read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, ...) uint8 rows [start, stop) (clipped to the array)."""
        n_rows = self.shape[0]
        start, stop = max(0, min(start, n_rows)), max(0, min(stop, n_rows))
        out = np.empty((max(0, stop - start),) + self.shape[1:], np.uint8)
        if stop <= start:
            return out
        c = self.chunk
        scratch: np.ndarray | None = None
        for index in range(start // c, -(-stop // c)):
            c0, c1 = index * c, (index + 1) * c
            lo, hi = max(start, c0), min(stop, c1)
            if lo == c0 and hi == c1:  # a whole chunk: decode straight into the output
                self.read_into(index, out[lo - start : hi - start])
            else:
                if scratch is None:
                    scratch = np.empty((c,) + self.shape[1:], np.uint8)
                self.read_into(index, scratch)
                out[lo - start : hi - start] = scratch[lo - c0 : hi - c0]
        return out


_REBUILD = "delete the store and re-run 'wsi-mil tile'"


class PatchStore:
    """Read access to a complete patch store. Use :meth:`open`."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._g = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._coords: np.ndarray | None = None
        self._chunk_reader: ChunkFileReader | None | bool = False  # False: not looked at yet

    @classmethod
    def open(cls, path: str | os.PathLike) -> PatchStore:
        """Open a complete store; raises :class:`StoreError` if missing or incomplete."""
        p = Path(path)
        if not p.exists():
            raise StoreError(f"{p}: patch store not found", "run 'wsi-mil tile' first")
        try:
            g = zarr.open_group(str(p), mode="r")
        except Exception as e:  # noqa: BLE001
            raise StoreError(
                f"{p}: not a readable zarr patch store ({e})", "delete it and re-run 'wsi-mil tile'"
            ) from None
        if not g.attrs.get("complete", False):
            raise StoreError(
                f"{p}: patch store is incomplete (interrupted run?)", "re-run 'wsi-mil tile'"
            )
        missing = [a for a in REQUIRED_ATTRS if a not in g.attrs]
        if missing or "coords" not in g:
            raise StoreError(
                f"{p}: patch store lacks {missing or ['coords']}", "re-run 'wsi-mil tile'"
            )
        return cls(p, g)

    # -- geometry -------------------------------------------------------
    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 (x, y) of each patch's top-left corner."""
        if self._coords is None:
            self._coords = np.asarray(self._g["coords"][:], dtype=np.int64).reshape(-1, 2)
        return self._coords

    def __len__(self) -> int:
        return int(self._g["coords"].shape[0])

    def __repr__(self) -> str:
        return f"PatchStore({str(self.path)!r}, n={len(self)}, patch_size={self.patch_size}, level={self.level})"

    @property
    def level0_size(self) -> tuple[int, int]:
        return int(self.attrs["level0_width"]), int(self.attrs["level0_height"])

    @property
    def norm_coords(self) -> np.ndarray:
        """(N, 2) float32 coordinates normalised by level-0 width/height, in [0, 1)."""
        w, h = self.level0_size
        return (self.coords / np.array([w, h], dtype=np.float64)).astype(np.float32)

    @property
    def patch_size(self) -> int:
        """Patch side in px at the output resolution."""
        return int(self.attrs["patch_size"])

    @property
    def level(self) -> int:
        return int(self.attrs["level"])

    @property
    def downsample(self) -> float:
        """Level-0 px per output px."""
        return float(self.attrs["downsample"])

    @property
    def patch_size_level0(self) -> int:
        """Patch side in level-0 px."""
        return int(round(self.patch_size * self.downsample))

    @property
    def patch_size_level(self) -> int:
        """Patch side in px read at ``level`` (differs from ``patch_size`` when resized)."""
        return int(self.attrs.get("patch_size_level", self.patch_size))

    @property
    def stride(self) -> int:
        """Grid step in output px."""
        return int(self.attrs.get("stride", self.patch_size))

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per px of the slide (None when unknown)."""
        from wsi_mil.slides.backends._util import valid_mpp

        return valid_mpp(self.attrs.get("mpp"))  # stores of old versions may hold inf

    @property
    def slide_path(self) -> Path | None:
        p = self.attrs.get("slide_path")
        return Path(p) if p else None

    # -- pixels ---------------------------------------------------------
    @property
    def has_pixels(self) -> bool:
        return "pixels" in self._g

    @property
    def tissue(self) -> np.ndarray | None:
        return np.asarray(self._g["tissue"][:], np.float32) if "tissue" in self._g else None

    def pixels(self, start: int, stop: int) -> np.ndarray:
        """(n, P, P, 3) uint8 stored pixels of patches [start, stop)."""
        if not self.has_pixels:
            raise StoreError(
                f"{self.path}: store has no pixels (tiled with --no-pixels)",
                "use read_patches(), which reads from the slide",
            )
        if self._chunk_reader is False:
            self._chunk_reader = ChunkFileReader.for_array(self.path / "pixels")
        if self._chunk_reader is not None and 0 <= start <= stop:
            return self._chunk_reader.read(start, stop)
        return np.asarray(self._g["pixels"][start:stop])

    def read_patches(self, start: int, stop: int, slide: Any = None) -> np.ndarray:
        """(n, P, P, 3) uint8 patches [start, stop): from the store, or from the slide for coords-only stores.

        ``slide``: an open :class:`wsi_mil.slides.Slide` (default: opened from ``slide_path``).
        """
        if self.has_pixels:
            return self.pixels(start, stop)
        from wsi_mil.tiling.read import read_patches_from_slide

        if slide is None:
            slide = self.open_slide()
        return read_patches_from_slide(
            slide, self.coords[start:stop], self.level, self.patch_size, self.patch_size_level
        )

    def open_slide(self, path: str | os.PathLike | None = None, backend: str | None = None) -> Any:
        """Open the source slide as tiling read it: the recorded backend, mpp and significant
        bits (``path`` overrides the recorded ``slide_path``, ``backend`` the backend)."""
        from wsi_mil.slides import open_slide

        p = path or self.slide_path
        if p is None:
            raise StoreError(
                f"{self.path}: store has no pixels and no slide_path", "re-tile with --pixels"
            )
        self._check_slide_size(Path(p))
        return open_slide(
            p,
            backend=backend or self.attrs.get("backend"),
            mpp=self.mpp,
            significant_bits=self.attrs.get("significant_bits"),
        )

    def _check_slide_size(self, path: Path) -> None:
        """StoreError when the file at ``path`` has another size than the one tiled (the
        recorded fingerprint): another slide (or a re-scan) at that path would give patches
        of the wrong image. The mtime is not compared: copies (e.g. staged to node-local
        scratch) keep the size but not the mtime. Folders (OME-Zarr, MRXS) are not checked."""
        rec = self.attrs.get("slide_fingerprint")
        size = rec.get("size") if isinstance(rec, dict) else None
        if size is None or not path.is_file():
            return
        now = path.stat().st_size
        if now != size:
            raise StoreError(
                f"{path} is not the slide {self.path.name} was tiled from: {now:,} bytes, "
                f"the tiled file had {size:,}",
                "give the slide's right path, or tile it again (wsi-mil tile rebuilds the "
                "stores of changed slides)",
            )


class PatchStoreWriter:
    """Write a store under a temporary name; :meth:`commit` marks it complete and renames it.

    ``with PatchStoreWriter(final, coords, attrs, patch_size, pixels=True) as w:``
    ``    w.write_pixels(start, arr)`` ... ; ``w.commit()``. Leaving the block without
    ``commit`` (e.g. an exception) removes the temporary store. ``encode_threads``: threads
    that encode and write chunks (default: the CPUs this process may use).
    """

    #: value of pixels past the last patch (zarr stores the last chunk full size)
    fill_value = 255

    def __init__(
        self,
        final: str | os.PathLike,
        coords: np.ndarray,
        attrs: dict[str, Any],
        pixels: bool = True,
        chunk_patches: int = 64,
        compressors: Any = "auto",
        tissue: np.ndarray | None = None,
        encode_threads: int | None = None,
    ) -> None:
        self.final = Path(final)
        self.coords = np.asarray(coords, np.int64).reshape(-1, 2)
        self.attrs = {**attrs, "wsi_mil_version": __version__, "complete": False}
        self.with_pixels = pixels
        self.chunk_patches = chunk_patches
        self.compressors = TileConfig.compression if compressors == "auto" else compressors
        self.tissue = tissue
        self._ctx = atomic_path(self.final)
        self._committed = False
        self._encoder: Any = None
        self._encode_threads = encode_threads

    def __enter__(self) -> PatchStoreWriter:
        self.tmp = self._ctx.__enter__()
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        n = len(self.coords)
        self.group.create_array("coords", data=self.coords, chunks=(max(1, min(n, 1 << 16)), 2))
        if self.tissue is not None:
            self.group.create_array(
                "tissue",
                data=np.asarray(self.tissue, np.float32),
                chunks=(max(1, min(n, 1 << 16)),),
            )
        if self.with_pixels:
            p = int(self.attrs["patch_size"])
            comp = self.compressors
            kw = {"compressors": pixel_compressors(comp) if isinstance(comp, str) else comp}
            self.pixels = self.group.create_array(
                "pixels",
                shape=(n, p, p, 3),
                chunks=(max(1, min(self.chunk_patches, n)), p, p, 3),
                dtype="uint8",
                fill_value=self.fill_value,
                # chunk files c.<i>.0.0.0 side by side: no directory to create per chunk
                chunk_key_encoding={"name": "default", "separator": "."},
                **kw,
            )
        self.group.update_attributes(self.attrs)  # one metadata write, not one per key
        return self

    def write_pixels(self, start: int, arr: np.ndarray) -> None:
        """Write (n, P, P, 3) uint8 patches at rows [start, start + n). Chunk-aligned writes are fastest.

        Chunk-aligned blocks of a store with a named compression (:data:`COMPRESSIONS`) are
        encoded here, in parallel, into per-thread reusable buffers and written as chunk
        files directly: byte-identical to what zarr writes, several times faster than zarr's
        own write path. Anything else goes through zarr. Returns when ``arr`` may be reused.
        """
        arr = np.asarray(arr, np.uint8)
        cp = self.pixels.chunks[0]
        if not self._direct(start, len(arr)):
            self.pixels[start : start + len(arr)] = arr
            return
        jobs = [self.write_chunk_async(start + k, arr[k : k + cp]) for k in range(0, len(arr), cp)]
        for j in jobs:
            j.result()

    def write_chunk_async(self, start: int, arr: np.ndarray) -> Future:
        """Encode and write ONE chunk (rows [start, start + n), ``start`` chunk-aligned, n = the
        chunk size or the rows left) in the writer's thread pool. ``arr`` must stay unchanged
        until the returned future is done; its ``result()`` raises what the write raised.

        The short last chunk may also be given :attr:`chunk_rows` long, its rows past the end
        holding :attr:`fill_value` (as zarr stores it): our own chunk-file writer then writes
        it as it is instead of copying it into a padded buffer.
        """
        arr = np.asarray(arr, np.uint8)
        cp, n_total = self.chunk_rows, len(self.coords)
        n = min(cp, n_total - start)
        if not (0 <= start < n_total and start % cp == 0 and len(arr) in (n, cp)):
            raise ValueError(
                f"write_chunk_async: rows [{start}, {start + len(arr)}) are not one chunk of "
                f"{cp} rows (or the {n} left) of a {n_total}-row store"
            )
        if not self._direct(start, n):
            arr = arr[:n]  # a full-size last chunk: rows past the end are not data
            done: Future = Future()
            try:
                self.write_pixels(start, arr)
                done.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to the caller via the future
                done.set_exception(e)
            return done
        if self._encoder is None:
            from wsi_mil.batch import available_cpus

            self._encoder = ThreadPoolExecutor(
                self._encode_threads or available_cpus(), thread_name_prefix="store-encode"
            )
        return self._encoder.submit(self._write_chunk, start // cp, arr)

    @property
    def chunk_rows(self) -> int:
        """Patches per chunk of ``pixels`` (the chunk size asked for, or fewer in a small store)."""
        return int(self.pixels.chunks[0])

    def _direct(self, start: int, n: int) -> bool:
        """Whether rows [start, start + n) can be written as whole chunk files by us."""
        cp, n_total = self.chunk_rows, len(self.coords)
        stop = start + n
        return (
            isinstance(self.compressors, str)
            and start % cp == 0
            and stop <= n_total
            and (stop % cp == 0 or stop == n_total)
        )

    def _write_chunk(self, index: int, block: np.ndarray) -> None:
        cp = self.pixels.chunks[0]
        if len(block) < cp:  # the last chunk is stored full size, padded with the fill value
            full = aligned_empty((cp,) + block.shape[1:])
            full[: len(block)] = block
            full[len(block) :] = self.fill_value
            block = full
        block = np.ascontiguousarray(block)
        if self.compressors == "none" and DIRECT_IO and block.ctypes.data % IO_ALIGN:
            aligned = _scratch_buffer(block.nbytes)[: block.nbytes]  # for O_DIRECT
            aligned[:] = block.reshape(-1)
            block = aligned
        data = encode_chunk(block, self.compressors)
        write_new_file(Path(self.tmp) / "pixels" / f"c.{index}.0.0.0", data)

    def commit(self) -> None:
        if self._encoder is not None:
            self._encoder.shutdown(wait=True)
        self.group.attrs["complete"] = True
        self._committed = True

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        if self._encoder is not None:
            self._encoder.shutdown(wait=True, cancel_futures=True)
        if et is None and not self._committed:
            et = StoreError
            ev = StoreError(f"{self.final}: writer closed without commit()")
        return bool(self._ctx.__exit__(et, ev, tb)) if et is not None else self._finish()

    def _finish(self) -> bool:
        self._ctx.__exit__(None, None, None)
        return False
