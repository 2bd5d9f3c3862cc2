"""Reading patch pixels from a slide.

Fast path (:func:`iter_patch_chunks`): the level is cut into *blocks* aligned to the
slide's native tile grid (``Slide.tile_grid``; one or a few tiles each). Every block that
any patch overlaps is read once with ``read_level_region`` (so every native tile is decoded
at most once per slide), in a thread pool, a bounded number of blocks ahead; patches are
cut from the decoded blocks in row-major order and a block is dropped as soon as the last
patch that needs it has been cut. Memory: about one row of blocks across the tissue plus
the read-ahead, independent of the number of patches.

Slow path (:func:`read_patches_from_slide`): one ``read_region`` per patch, used for
coords-only stores and as the reference in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wsi_mil.slides.base import PAD_VALUE, Slide

#: blocks are at least this many px wide/high (small native tiles are grouped)
MIN_BLOCK_PX = 256
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
    """Bilinear resize of an (h, w, 3) uint8 image to (size_px, size_px, 3) (Pillow)."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size_px, size_px), Image.Resampling.BILINEAR))


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
    Blocks are decoded in ``pool``, at most ``max_blocks_ahead`` (default 8 per pool thread)
    beyond the chunk being cut.

    ``get_buffer(n)``: returns an (n, patch_px, patch_px, 3) uint8 array (any content) to cut
    the next chunk into, so a caller can recycle a few buffers instead of touching fresh
    memory for every chunk; default: a new array per chunk.
    """
    xy = np.asarray(level_xy, np.int64).reshape(-1, 2)
    n = len(xy)
    if n == 0:
        return
    lw, lh = slide.level_dimensions[level]
    grid = slide.tile_grid(level)
    bw, bh = block_size(grid.tile_w if grid else None, grid.tile_h if grid else None)
    plan = plan_blocks(xy, patch_px_level, lw, lh, bw, bh)
    starts = list(range(0, n, chunk_patches))
    chunk_keys = [plan.keys(s, min(s + chunk_patches, n)) for s in starts]
    last_use: dict[int, int] = {}
    for j, keys in enumerate(chunk_keys):
        for k in keys.tolist():
            last_use[k] = j
    ahead = max_blocks_ahead or 8 * max(1, getattr(pool, "_max_workers", 1))
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
            out = (
                get_buffer(e - s)
                if get_buffer is not None
                else np.empty((e - s, patch_px, patch_px, 3), np.uint8)
            )
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
