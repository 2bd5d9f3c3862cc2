"""Reading patch pixels from a slide.

Fast path (:func:`iter_patch_chunks`), for levels stored in native tiles of >= 64 px: every
native tile that any patch overlaps is decoded exactly once, in a thread pool, into that
thread's reused scratch buffer (``Slide.read_tiles``), and its pieces are copied straight
into the chunk buffers of the patches that overlap it (a *scatter*) while the tile is still
in the CPU cache. A chunk is yielded when every tile it needs is done. Patches read larger
and resized (``--mpp`` between levels) are scattered into level-resolution sub-chunks and
resized in the pool. Memory: the chunks of about two rows of patches plus the read-ahead.

Block path: the same, the other way round, for untiled images and small tiles: the level
is cut into tile-aligned *blocks*, each read once, and patches are cut from them in order.

Per-patch path: one window read per patch, for levels whose windows are not exact
(``Slide.windows_exact``: OpenSlide levels with a non-integer downsample).

Slow path (:func:`read_patches_from_slide`): one ``read_region`` per patch, used for
coords-only stores and as the reference in tests.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wsi_mil.batch import pool_workers
from wsi_mil.slides.base import PAD_VALUE, Slide, TileGrid
from wsi_mil.tiling.patch_store import anonymous_pages

#: blocks are at least this many px wide/high (small native tiles are grouped)
MIN_BLOCK_PX = 256
#: native tiles smaller than this go through the block path, which groups them: scattering
#: them one by one would cost a task piece per ~(patch / tile)^2 and much Python per pixel
MIN_SCATTER_TILE_PX = 64
#: block side for untiled images (strip TIFFs, PNG/JPEG, in-memory images)
UNTILED_BLOCK_PX = 512


def read_patches_from_slide(
    slide: Slide, level0_xy: np.ndarray, level: int, patch_px: int, patch_px_level: int
) -> np.ndarray:
    """(n, patch_px, patch_px, 3) uint8: each patch read at ``level`` (``patch_px_level`` px) and resized.

    Slow path (one ``read_region`` per patch); tiling uses tile-aligned blocks instead.
    """
    out = np.empty((len(level0_xy), patch_px, patch_px, 3), np.uint8)
    for i, (x, y) in enumerate(np.asarray(level0_xy).reshape(-1, 2)):
        reg = slide.read_region(level, int(x), int(y), patch_px_level, patch_px_level)
        out[i] = reg if patch_px_level == patch_px else resize_rgb(reg, patch_px)
    return out


def resize_rgb(img: np.ndarray, size_px: int) -> np.ndarray:
    """(size_px, size_px, 3) uint8: an (h, w, 3) uint8 image resized as :func:`resize_patches`."""
    return resize_patches(np.asarray(img)[None], size_px)[0]


def _import_resize() -> None:
    """Import torch (for :func:`resize_patches`) in the calling thread, before the pool's
    threads need it: one import, not several racing ones."""
    import torch  # noqa: F401


def resize_patches(patches: np.ndarray, size_px: int, out: np.ndarray | None = None) -> np.ndarray:
    """(n, size_px, size_px, 3) uint8: each (h, w, 3) uint8 patch of ``patches`` (n, h, w, 3)
    resized bilinearly, antialiased when shrinking; written into ``out`` when given.

    Torch's uint8 channels-last kernel: within 1 grey level of Pillow's ``BILINEAR`` (which
    CLAM uses) and about 5x faster than it on 2 CPUs (``--mpp`` between pyramid levels
    spent most of its time here). Runs in the calling thread and releases the GIL.
    """
    import torch
    import torch.nn.functional as F

    arr = np.asarray(patches)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected (n, h, w, 3) uint8 patches, got {arr.shape} {arr.dtype}")
    if out is None:
        out = np.empty((len(arr), size_px, size_px, 3), np.uint8)
    if len(arr) == 0:
        return out
    if not (arr.flags.c_contiguous and arr.flags.writeable):  # torch.from_numpy needs both
        arr = np.array(arr, order="C")
    # NHWC memory seen as NCHW: the channels-last layout torch's fast uint8 path takes
    src = torch.from_numpy(arr).permute(0, 3, 1, 2)
    with torch.no_grad():
        res = F.interpolate(
            src, size=(size_px, size_px), mode="bilinear", antialias=True, align_corners=False
        )
    np.copyto(out, res.permute(0, 2, 3, 1).numpy())
    return out


# ---------------------------------------------------------------- block plan (pure)
@dataclass(frozen=True)
class BlockPlan:
    """Tile-aligned blocks of one level and which blocks each patch needs.

    ``block_w``/``block_h``: block size in level px; ``n_cols``/``n_rows``: blocks across/down;
    ``col0..row1`` (N,) int64 inclusive block ranges of each patch (clipped to the level).
    Block key = ``row * n_cols + col``.
    """

    block_w: int
    block_h: int
    n_cols: int
    n_rows: int
    col0: np.ndarray
    col1: np.ndarray
    row0: np.ndarray
    row1: np.ndarray

    def keys(self, start: int, stop: int) -> np.ndarray:
        """Sorted unique block keys needed by patches [start, stop)."""
        c0, c1 = self.col0[start:stop], self.col1[start:stop]
        r0, r1 = self.row0[start:stop], self.row1[start:stop]
        if len(c0) == 0:
            return np.zeros(0, np.int64)
        span_c = int((c1 - c0).max()) + 1
        span_r = int((r1 - r0).max()) + 1
        parts = []
        for dr in range(span_r):
            for dc in range(span_c):
                ok = (r0 + dr <= r1) & (c0 + dc <= c1)
                parts.append(((r0 + dr) * self.n_cols + (c0 + dc))[ok])
        return np.unique(np.concatenate(parts))

    def origin(self, key: int) -> tuple[int, int]:
        """Level-px (x, y) of block ``key``'s top-left corner."""
        r, c = divmod(int(key), self.n_cols)
        return c * self.block_w, r * self.block_h


def block_size(tile_w: int | None, tile_h: int | None) -> tuple[int, int]:
    """Block (w, h) in level px: whole native tiles, at least :data:`MIN_BLOCK_PX` a side."""
    if not tile_w or not tile_h:
        return UNTILED_BLOCK_PX, UNTILED_BLOCK_PX
    bw = tile_w * max(1, -(-MIN_BLOCK_PX // tile_w))
    bh = tile_h * max(1, -(-MIN_BLOCK_PX // tile_h))
    return bw, bh


def plan_blocks(
    level_xy: np.ndarray,
    patch_px_level: int,
    level_w: int,
    level_h: int,
    block_w: int,
    block_h: int,
) -> BlockPlan:
    """Block ranges of square patches at ``level_xy`` (N, 2) level px, ``patch_px_level`` a side.

    Only the part of a patch inside the level needs blocks; the rest is white padding.
    """
    xy = np.asarray(level_xy, np.int64).reshape(-1, 2)
    x0 = np.clip(xy[:, 0], 0, level_w - 1)
    y0 = np.clip(xy[:, 1], 0, level_h - 1)
    x1 = np.clip(xy[:, 0] + patch_px_level, 1, level_w) - 1
    y1 = np.clip(xy[:, 1] + patch_px_level, 1, level_h) - 1
    return BlockPlan(
        block_w,
        block_h,
        -(-level_w // block_w),
        -(-level_h // block_h),
        x0 // block_w,
        np.maximum(x1, x0) // block_w,
        y0 // block_h,
        np.maximum(y1, y0) // block_h,
    )


# ---------------------------------------------------------------- scatter plan (pure)
@dataclass(frozen=True)
class ScatterPlan:
    """Which pieces of which native tiles make up each patch, grouped by tile.

    ``tile_col``/``tile_row`` (T,): the tiles needed, in row-major order; the pieces of tile
    ``t`` are ``[start[t], start[t + 1])`` of the (M,) piece arrays: ``patch`` (index of the
    patch), ``src`` (M, 4) ``(y, x, h, w)`` of the piece in the tile and ``dst`` (M, 2)
    ``(y, x)`` in the patch, all level px. Only the in-level part of a patch has pieces;
    ``inside`` (N,) is False for patches that run past the level edge (they need padding).
    """

    tile_col: np.ndarray
    tile_row: np.ndarray
    start: np.ndarray
    patch: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    inside: np.ndarray


def plan_scatter(
    level_xy: np.ndarray,
    patch_px: int,
    level_w: int,
    level_h: int,
    tile_w: int,
    tile_h: int,
) -> ScatterPlan:
    """Scatter plan of square patches at ``level_xy`` (N, 2) level px, ``patch_px`` a side,
    over a level of ``level_w`` x ``level_h`` px stored in ``tile_w`` x ``tile_h`` tiles."""
    xy = np.asarray(level_xy, np.int64).reshape(-1, 2)
    px, py = xy[:, 0], xy[:, 1]
    x0, x1 = np.clip(px, 0, level_w), np.clip(px + patch_px, 0, level_w)
    y0, y1 = np.clip(py, 0, level_h), np.clip(py + patch_px, 0, level_h)
    valid = (x1 > x0) & (y1 > y0)
    c0, c1 = x0 // tile_w, (np.maximum(x1, 1) - 1) // tile_w
    r0, r1 = y0 // tile_h, (np.maximum(y1, 1) - 1) // tile_h
    parts: list[tuple[np.ndarray, ...]] = []
    if valid.any():
        span_c = int((c1 - c0)[valid].max()) + 1
        span_r = int((r1 - r0)[valid].max()) + 1
        for dr in range(span_r):
            for dc in range(span_c):
                i = np.flatnonzero(valid & (r0 + dr <= r1) & (c0 + dc <= c1))
                c, r = c0[i] + dc, r0[i] + dr
                tx, ty = c * tile_w, r * tile_h
                ix0, ix1 = np.maximum(x0[i], tx), np.minimum(x1[i], tx + tile_w)
                iy0, iy1 = np.maximum(y0[i], ty), np.minimum(y1[i], ty + tile_h)
                parts.append(
                    (r, c, i, iy0 - ty, ix0 - tx, iy1 - iy0, ix1 - ix0, iy0 - py[i], ix0 - px[i])
                )
    if parts:
        r, c, i, sy, sx, h, w, dy, dx = (np.concatenate(a) for a in zip(*parts, strict=True))
    else:
        r = c = i = sy = sx = h = w = dy = dx = np.zeros(0, np.int64)
    n_across = -(-level_w // tile_w)
    key = r * n_across + c
    order = np.lexsort((i, key))
    key = key[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    inside = (px >= 0) & (py >= 0) & (px + patch_px <= level_w) & (py + patch_px <= level_h)
    return ScatterPlan(
        tile_col=c[order][first],
        tile_row=r[order][first],
        start=np.r_[first, len(key)].astype(np.int64),
        patch=i[order],
        src=np.stack([sy, sx, h, w], 1)[order],
        dst=np.stack([dy, dx], 1)[order],
        inside=inside,
    )


#: decode buffers start this many bytes past a page boundary. libjpeg-turbo writing its
#: RGB rows to a 32-byte-aligned buffer ran 25-35 % slower on the 2-core CI machine (Xeon,
#: AVX-512) than to one 16 bytes off: loads from its own aligned row buffers and stores to
#: ours 4 KiB apart alias. bench/tile.py measures both in its decode-limit rows.
DECODE_BUFFER_OFFSET = 16

_scratch = threading.local()


def tile_scratch(tile_h: int, tile_w: int) -> np.ndarray:
    """This thread's reused (tile_h, tile_w, 3) uint8 decode buffer (see DECODE_BUFFER_OFFSET)."""
    shape = (tile_h, tile_w, 3)
    buf = getattr(_scratch, "tile", None)
    if buf is None or buf.shape != shape:
        n = tile_h * tile_w * 3
        raw = anonymous_pages(n + DECODE_BUFFER_OFFSET)
        buf = _scratch.tile = raw[DECODE_BUFFER_OFFSET:].reshape(shape)
    return buf


# ---------------------------------------------------------------- fast path
def iter_patch_chunks(
    slide: Slide,
    level: int,
    level_xy: np.ndarray,
    patch_px_level: int,
    patch_px: int,
    chunk_patches: int,
    pool: ThreadPoolExecutor,
    max_blocks_ahead: int | None = None,
    get_buffer: Callable[[int], np.ndarray] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, pixels)`` for consecutive chunks of ``chunk_patches`` patches, in order.

    ``pixels``: (n, patch_px, patch_px, 3) uint8 of the patches at ``level_xy`` (N, 2) level px,
    read ``patch_px_level`` px a side at ``level`` (resized when it differs from ``patch_px``),
    white past the image edge; equal to :func:`read_patches_from_slide` of the same patches.
    Tiles (or blocks) are decoded in ``pool``, at most ``max_blocks_ahead`` ahead of the
    oldest unfinished one (default :data:`AHEAD_TILES_PER_WORKER` tiles, or 8 blocks, per
    pool thread).

    ``get_buffer(n)``: returns an (n, patch_px, patch_px, 3) uint8 array (any content) to cut
    the next chunk into, so a caller can recycle a few buffers instead of touching fresh
    memory for every chunk; default: a new array per chunk.

    Memory: with ``level_xy`` in row-major grid order (as tiling passes them) about two rows
    of patches are open at once; unsorted coordinates can keep every chunk open.
    """
    xy = np.asarray(level_xy, np.int64).reshape(-1, 2)
    n = len(xy)
    if n == 0:
        return
    if not slide.windows_exact(level):
        yield from _iter_per_patch(
            slide, level, xy, patch_px_level, patch_px, chunk_patches, pool, get_buffer
        )
        return
    grid = slide.tile_grid(level)
    if grid is not None and min(grid.tile_w, grid.tile_h) >= MIN_SCATTER_TILE_PX:
        if patch_px_level == patch_px:
            yield from _iter_scatter(
                slide,
                level,
                xy,
                patch_px,
                chunk_patches,
                pool,
                grid,
                max_blocks_ahead,
                get_buffer,
            )
        else:
            yield from _iter_scatter_resized(
                slide,
                level,
                xy,
                patch_px_level,
                patch_px,
                chunk_patches,
                pool,
                grid,
                max_blocks_ahead,
                get_buffer,
            )
        return
    lw, lh = slide.level_dimensions[level]
    bw, bh = block_size(grid.tile_w if grid else None, grid.tile_h if grid else None)
    plan = plan_blocks(xy, patch_px_level, lw, lh, bw, bh)
    starts = list(range(0, n, chunk_patches))
    chunk_keys = [plan.keys(s, min(s + chunk_patches, n)) for s in starts]
    last_use: dict[int, int] = {}
    for j, keys in enumerate(chunk_keys):
        for k in keys.tolist():
            last_use[k] = j
    ahead = max_blocks_ahead or 8 * pool_workers(pool)
    # decoded blocks kept at most: the read-ahead plus the rows of blocks that patch rows
    # still to come share with the current one (bounds memory when decoding outruns cutting)
    rows_per_patch = -(-patch_px_level // bh) + 1
    max_held = ahead + plan.n_cols * rows_per_patch

    inside = (
        (xy[:, 0] >= 0)
        & (xy[:, 1] >= 0)
        & (xy[:, 0] + patch_px_level <= lw)
        & (xy[:, 1] + patch_px_level <= lh)
    )
    scratch = (
        np.empty((patch_px_level, patch_px_level, 3), np.uint8)
        if patch_px_level != patch_px
        else None
    )

    def read_block(key: int) -> np.ndarray:
        bx, by = plan.origin(key)
        return slide.read_level_region(level, bx, by, bw, bh)

    blocks: dict[int, Future] = {}
    next_chunk = 0  # first chunk whose blocks are not all submitted yet
    try:
        for j, s in enumerate(starts):
            # submit blocks of this chunk and of following chunks while under the read-ahead
            while next_chunk < len(starts) and (
                next_chunk <= j or (_pending(blocks) < ahead and len(blocks) < max_held)
            ):
                for k in chunk_keys[next_chunk].tolist():
                    if k not in blocks:
                        blocks[k] = pool.submit(read_block, k)
                next_chunk += 1
            e = min(s + chunk_patches, n)
            out = _chunk_buffer(get_buffer, e - s, patch_px)
            for i in range(s, e):
                dst = scratch if scratch is not None else out[i - s]
                if not inside[i]:  # only patches that cross the image edge need padding
                    dst.fill(PAD_VALUE)
                _cut(dst, xy[i], patch_px_level, plan, blocks, i, lw, lh)
                if scratch is not None:
                    out[i - s] = resize_rgb(scratch, patch_px)
            for k in chunk_keys[j].tolist():
                if last_use[k] == j:
                    del blocks[k]
            yield s, out
    finally:
        for f in blocks.values():
            f.cancel()


#: tiles submitted to the read pool ahead of the oldest unfinished one, per worker
AHEAD_TILES_PER_WORKER = 32
#: native tiles decoded + scattered per task of the read pool (fewer, larger tasks: a
#: future per tile cost ~10 % of the CPU in GIL hand-offs)
TILES_PER_TASK = 16


def _iter_scatter(
    slide: Slide,
    level: int,
    xy: np.ndarray,
    patch_px: int,
    chunk_patches: int,
    pool: ThreadPoolExecutor,
    grid: TileGrid,
    max_tiles_ahead: int | None,
    get_buffer: Callable[[int], np.ndarray] | None,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`iter_patch_chunks` for tiled levels read at the patch size: decode + scatter."""
    n = len(xy)
    tile_w, tile_h = grid.tile_w, grid.tile_h
    lw, lh = slide.level_dimensions[level]
    plan = plan_scatter(xy, patch_px, lw, lh, tile_w, tile_h)
    n_tiles, n_chunks = len(plan.start) - 1, -(-n // chunk_patches)
    # tasks: runs of TILES_PER_TASK tiles in row-major order; pieces of task b are
    # [piece_at[b], piece_at[b + 1])
    task_tiles = list(range(0, n_tiles, TILES_PER_TASK)) + [n_tiles]
    n_tasks = len(task_tiles) - 1
    piece_at = plan.start[task_tiles]
    # python ints: the per-piece loop below runs ~3 times per patch
    cols, rows = plan.tile_col.tolist(), plan.tile_row.tolist()
    start = plan.start.tolist()
    piece_chunk = plan.patch // chunk_patches
    # (M, 8) per piece: chunk, patch in chunk, src y x h w, dst y x; made python ints per task
    pieces = np.column_stack([piece_chunk, plan.patch % chunk_patches, plan.src, plan.dst]).astype(
        np.int32
    )
    # pieces each chunk waits for; chunks each task fills (its last one must have a buffer
    # before the task starts)
    left = np.bincount(piece_chunk, minlength=n_chunks).tolist()
    task_chunks = [
        collections.Counter(piece_chunk[piece_at[b] : piece_at[b + 1]].tolist())
        for b in range(n_tasks)
    ]
    need_upto = np.maximum.accumulate([max(c, default=-1) for c in task_chunks]).tolist()
    padded = ~plan.inside
    buffers: list[np.ndarray | None] = [None] * n_chunks
    ahead_tiles = max_tiles_ahead or AHEAD_TILES_PER_WORKER * pool_workers(pool)
    ahead = max(1, -(-ahead_tiles // TILES_PER_TASK))

    def scatter(b: int) -> None:
        out = tile_scratch(tile_h, tile_w)
        p0 = int(piece_at[b])
        mine = pieces[p0 : piece_at[b + 1]].tolist()
        t0, t1 = task_tiles[b], task_tiles[b + 1]
        # one call for the task's tiles: a backend reads tiles adjacent in the file at once
        tiles = slide.read_tiles(level, zip(cols[t0:t1], rows[t0:t1], strict=True), out=out)
        for t, tile in zip(range(t0, t1), tiles, strict=True):
            for j, k, sy, sx, h, w, dy, dx in mine[start[t] - p0 : start[t + 1] - p0]:
                buffers[j][k, dy : dy + h, dx : dx + w] = tile[sy : sy + h, sx : sx + w]

    opened = 0  # chunks [0, opened) have buffers
    done_upto = 0  # chunks [0, done_upto) were yielded

    def open_upto(j_last: int) -> None:
        nonlocal opened
        while opened <= j_last:
            s, e = opened * chunk_patches, min((opened + 1) * chunk_patches, n)
            buf = _chunk_buffer(get_buffer, e - s, patch_px)
            for k in np.flatnonzero(padded[s:e]).tolist():  # patches past the level edge
                buf[k].fill(PAD_VALUE)
            buffers[opened] = buf
            opened += 1

    pending: collections.deque[tuple[int, Future]] = collections.deque()
    try:
        for b in range(n_tasks + 1):
            if b < n_tasks:
                open_upto(need_upto[b])
                pending.append((b, pool.submit(scatter, b)))
            # collect finished tasks (oldest first; all of them once everything is submitted)
            while pending and (b == n_tasks or len(pending) >= ahead or pending[0][1].done()):
                bb, fut = pending.popleft()
                fut.result()
                for j, cnt in task_chunks[bb].items():
                    left[j] -= cnt
                while done_upto < opened and left[done_upto] == 0:
                    buf, buffers[done_upto] = buffers[done_upto], None
                    yield done_upto * chunk_patches, buf
                    done_upto += 1
        open_upto(n_chunks - 1)  # chunks no tile touches (all their patches past the edge)
        while done_upto < n_chunks:
            buf, buffers[done_upto] = buffers[done_upto], None
            yield done_upto * chunk_patches, buf
            done_upto += 1
    finally:
        _cancel_and_wait([fut for _, fut in pending])


#: the resize path scatters into level-resolution sub-chunks of at most this many bytes
RESIZE_SUBCHUNK_BYTES = 32 << 20


def _iter_scatter_resized(
    slide: Slide,
    level: int,
    xy: np.ndarray,
    patch_px_level: int,
    patch_px: int,
    chunk_patches: int,
    pool: ThreadPoolExecutor,
    grid: TileGrid,
    max_tiles_ahead: int | None,
    get_buffer: Callable[[int], np.ndarray] | None,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`iter_patch_chunks` for patches read at ``patch_px_level`` and resized: scatter
    into level-resolution sub-chunks, resize them in the pool into the output chunks, yield
    those in order."""
    n = len(xy)
    _import_resize()
    pl = patch_px_level
    # sub-chunks: a divisor of the chunk size, at most RESIZE_SUBCHUNK_BYTES of level pixels
    limit = max(1, RESIZE_SUBCHUNK_BYTES // (3 * pl * pl))
    sub = max(d for d in range(1, chunk_patches + 1) if chunk_patches % d == 0 and d <= limit)
    n_workers = pool_workers(pool)
    free: list[np.ndarray] = []  # recycled level-resolution sub-chunk buffers
    lent: dict[int, np.ndarray] = {}

    def level_buffer(m: int) -> np.ndarray:
        buf = free.pop() if free else np.empty((sub, pl, pl, 3), np.uint8)
        lent[buf.ctypes.data] = buf
        return buf[:m]

    outs: dict[int, list] = {}  # output chunk -> [buffer, sub-chunks not resized yet]
    pending: collections.deque[tuple[int, Future, np.ndarray]] = collections.deque()
    next_q = 0

    def finish_oldest() -> None:
        q, fut, src = pending.popleft()
        fut.result()
        free.append(lent.pop(src.ctypes.data))
        outs[q][1] -= 1

    try:
        for s, level_px in _iter_scatter(
            slide,
            level,
            xy,
            pl,
            sub,
            pool,
            grid,
            max_tiles_ahead,
            level_buffer,
        ):
            q = s // chunk_patches
            if q not in outs:
                m = min(chunk_patches, n - q * chunk_patches)
                buf = _chunk_buffer(get_buffer, m, patch_px)
                outs[q] = [buf, -(-m // sub)]
            k0 = s - q * chunk_patches
            dst = outs[q][0][k0 : k0 + len(level_px)]
            pending.append((q, pool.submit(resize_patches, level_px, patch_px, dst), level_px))
            while pending and (pending[0][1].done() or len(pending) > 2 * n_workers):
                finish_oldest()
            while next_q in outs and outs[next_q][1] == 0:
                yield next_q * chunk_patches, outs.pop(next_q)[0]
                next_q += 1
        while pending:
            finish_oldest()
        while next_q in outs:
            yield next_q * chunk_patches, outs.pop(next_q)[0]
            next_q += 1
    finally:
        _cancel_and_wait([fut for _, fut, _ in pending])


def _iter_per_patch(
    slide: Slide,
    level: int,
    xy: np.ndarray,
    patch_px_level: int,
    patch_px: int,
    chunk_patches: int,
    pool: ThreadPoolExecutor,
    get_buffer: Callable[[int], np.ndarray] | None,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`iter_patch_chunks` by one window read per patch, for levels whose windows are
    not exact (see ``Slide.windows_exact``): slow, but equal to ``read_region`` per patch."""
    n = len(xy)
    if patch_px_level != patch_px:
        _import_resize()
    n_workers = pool_workers(pool)

    def read(buf: np.ndarray, s: int, e: int, k0: int) -> None:
        for i in range(s, e):
            reg = slide.read_level_region(
                level, int(xy[i, 0]), int(xy[i, 1]), patch_px_level, patch_px_level
            )
            buf[k0 + i - s] = reg if patch_px_level == patch_px else resize_rgb(reg, patch_px)

    for s in range(0, n, chunk_patches):
        e = min(s + chunk_patches, n)
        buf = _chunk_buffer(get_buffer, e - s, patch_px)
        step = -(-(e - s) // n_workers)
        parts = [pool.submit(read, buf, a, min(a + step, e), a - s) for a in range(s, e, step)]
        try:
            for f in parts:
                f.result()
        finally:
            _cancel_and_wait(parts)
        yield s, buf


def _chunk_buffer(
    get_buffer: Callable[[int], np.ndarray] | None, n: int, patch_px: int
) -> np.ndarray:
    """(n, patch_px, patch_px, 3) uint8 to fill: from ``get_buffer`` or new."""
    if get_buffer is not None:
        return get_buffer(n)
    return np.empty((n, patch_px, patch_px, 3), np.uint8)


def _cancel_and_wait(futures: list[Future]) -> None:
    """Cancel the tasks not started and wait for the running ones: no task may write into a
    buffer after the generator that submitted it has returned."""
    for f in futures:
        f.cancel()
    for f in futures:
        if not f.cancelled():
            f.exception()


def _pending(blocks: dict[int, Future]) -> int:
    return sum(1 for f in blocks.values() if not f.done())


def _cut(
    dst: np.ndarray,
    xy: np.ndarray,
    size: int,
    plan: BlockPlan,
    blocks: dict[int, Future],
    i: int,
    level_w: int,
    level_h: int,
) -> None:
    """Copy the in-level part of the patch at level px ``xy`` from its blocks into ``dst``."""
    px, py = int(xy[0]), int(xy[1])
    bw, bh = plan.block_w, plan.block_h
    for r in range(int(plan.row0[i]), int(plan.row1[i]) + 1):
        for c in range(int(plan.col0[i]), int(plan.col1[i]) + 1):
            block = blocks[r * plan.n_cols + c].result()
            bx, by = c * bw, r * bh
            x0, y0 = max(px, bx, 0), max(py, by, 0)
            x1 = min(px + size, bx + bw, level_w)
            y1 = min(py + size, by + bh, level_h)
            if x1 > x0 and y1 > y0:
                dst[y0 - py : y1 - py, x0 - px : x1 - px] = block[
                    y0 - by : y1 - by, x0 - bx : x1 - bx
                ]
