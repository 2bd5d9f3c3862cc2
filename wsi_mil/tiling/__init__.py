"""Tiling: slides -> tissue mask -> patch grid -> zarr patch stores (``W/patches/<id>.zarr``).

``tile_slides(cfg, entries, shard, progress) -> BatchResult`` runs the stage;
``PatchStore.open(path)`` reads a store; the grid and tissue maths are pure functions in
:mod:`wsi_mil.tiling.grid` and :mod:`wsi_mil.tiling.tissue`.
"""

from wsi_mil.tiling.patch_store import PatchStore, PatchStoreWriter
from wsi_mil.tiling.tile import tile_slide, tile_slides

__all__ = ["PatchStore", "PatchStoreWriter", "tile_slide", "tile_slides"]
