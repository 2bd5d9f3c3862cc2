"""OME-Zarr (OME-NGFF multiscales v0.4 / v0.5; zarr v2 and v3 stores, also zipped).

Levels are the multiscales ``datasets`` in order; level 0 mpp comes from the first
dataset's ``scale`` transform (times any multiscale-wide scale) on the x axis, converted
from the axis ``unit`` to µm (None when the axis has no unit). Axes may be any NGFF
order (``c,y,x``, ``t,c,z,y,x``, ...) and also the non-standard ``y,x,c``; t/z take index 0.
Channels: 3 or more -> channels 0, 1, 2 as RGB (a 4th, e.g. alpha, is ignored); 1 or 2
-> channel 0 as gray, replicated. Samples wider than 8 bits keep their top 8 bits (uint16:
``>> 8``; floats are taken as 0..1). A bioformats2raw layout (image in ``0/``) is followed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slides import register_backend
from wsi_mil.slides.backends._util import (
    UM_PER_UNIT,
    first_line,
    lower_name,
    to_rgb,
    to_uint8,
)
from wsi_mil.slides.base import Slide, TileGrid

_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs", ".zarray")


def _looks_like_zarr(path: Path) -> bool:
    if path.is_dir():
        return lower_name(path).endswith(".zarr") or any((path / m).exists() for m in _ZARR_MARKERS)
    return path.is_file() and lower_name(path).endswith((".zarr.zip", ".ozx"))


@register_backend("zarr", priority=5)
class ZarrSlide(Slide):
    """An NGFF multiscale image; reads decode only the chunks a window touches."""

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return _looks_like_zarr(path)

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import zarr

        super().__init__(path, mpp)
        self._store = None
        try:
            if self.path.is_file():
                from zarr.storage import ZipStore

                self._store = ZipStore(self.path, mode="r")
                root = zarr.open_group(self._store, mode="r")
            else:
                root = zarr.open_group(str(self.path), mode="r")
        except Exception as e:  # noqa: BLE001
            raise SlideError(
                f"{self.path}: not a readable zarr group ({first_line(e)})",
                "an OME-Zarr image is a folder with zarr.json (zarr v3) or .zgroup/.zattrs (zarr v2)",
            ) from None
        group, ms, self.ngff_version = _find_multiscales(root)
        if ms is None:
            raise SlideError(
                f"{self.path}: zarr group has no OME-NGFF 'multiscales' metadata (empty or not an OME-Zarr image)",
                "write it with an NGFF writer (ome-zarr, bioformats2raw, `wsi-mil synth --format ome-zarr`)",
            )
        self._axes = _axis_names(ms.get("axes"), self.path)
        for a in ("y", "x"):
            if a not in self._axes:
                raise SlideError(f"{self.path}: multiscales axes {self._axes} have no {a!r} axis")
        datasets = ms.get("datasets") or []
        if not datasets:
            raise SlideError(f"{self.path}: multiscales has no datasets (no pyramid levels)")
        self._arrays: list[Any] = []
        for ds in datasets:
            try:
                arr = group[ds["path"]]
            except Exception as e:  # noqa: BLE001
                raise SlideError(
                    f"{self.path}: level array {ds.get('path')!r} is missing or unreadable ({first_line(e)})"
                ) from None
            if len(arr.shape) != len(self._axes):
                raise SlideError(
                    f"{self.path}: array {ds['path']!r} has {len(arr.shape)} dims but axes are {self._axes}"
                )
            self._arrays.append(arr)
        self._yi, self._xi = self._axes.index("y"), self._axes.index("x")
        self._ci = self._axes.index("c") if "c" in self._axes else None
        dims = [(int(a.shape[self._xi]), int(a.shape[self._yi])) for a in self._arrays]
        # keep strictly shrinking levels only
        self._levels = [0]
        for i in range(1, len(dims)):
            if dims[i][0] < dims[self._levels[-1]][0] or dims[i][1] < dims[self._levels[-1]][1]:
                self._levels.append(i)
        self._dims = [dims[i] for i in self._levels]
        self._native_mpp = _ngff_mpp(ms, datasets[0], self._axes)
        n_c = int(self._arrays[0].shape[self._ci]) if self._ci is not None else 1
        self._channels: list[int] = [0, 1, 2] if n_c >= 3 else [0]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self._dims

    @property
    def native_mpp(self) -> float | None:
        return self._native_mpp

    def tile_grid(self, level: int) -> TileGrid | None:
        chunks = self._arrays[self._levels[level]].chunks
        return TileGrid(int(chunks[self._xi]), int(chunks[self._yi]))

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        arr = self._arrays[self._levels[level]]
        sel: list[Any] = []
        for i, _a in enumerate(self._axes):
            if i == self._yi:
                sel.append(slice(ly, ly + h))
            elif i == self._xi:
                sel.append(slice(lx, lx + w))
            elif i == self._ci:
                sel.append(slice(self._channels[0], self._channels[-1] + 1))
            else:
                sel.append(0)
        data = np.asarray(arr[tuple(sel)])
        # remaining axes are a permutation of (y, x[, c]) in stored order
        kept = [a for i, a in enumerate(self._axes) if i in (self._yi, self._xi, self._ci)]
        order = [kept.index("y"), kept.index("x")] + (
            [kept.index("c")] if self._ci is not None else []
        )
        data = np.transpose(data, order)
        if data.ndim == 2:
            data = data[:, :, None]
        return to_rgb(to_uint8(data, self.significant_bits))

    def properties(self) -> dict:
        d = super().properties()
        d["ngff_version"] = self.ngff_version
        d["axes"] = "".join(self._axes)
        return d

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def _find_multiscales(root: Any) -> tuple[Any, dict | None, str | None]:
    """(group holding the image, its first multiscales entry, NGFF version) or (root, None, None)."""
    for group in _candidate_groups(root):
        attrs = dict(group.attrs)
        if "ome" in attrs and isinstance(attrs["ome"], dict):
            ome = attrs["ome"]
            ms = ome.get("multiscales")
            if ms:
                return group, ms[0], str(ome.get("version", "0.5"))
        ms = attrs.get("multiscales")
        if ms:
            return group, ms[0], str(ms[0].get("version", "0.4"))
    return root, None, None


def _candidate_groups(root: Any) -> list[Any]:
    out = [root]
    try:
        sub = root["0"]
        if hasattr(sub, "attrs") and not hasattr(sub, "shape"):  # bioformats2raw: image in 0/
            out.append(sub)
    except Exception:  # noqa: BLE001
        pass
    return out


def _axis_names(axes: Any, path: Path) -> list[str]:
    if axes is None:  # NGFF <= 0.3 without axes: 5D tczyx
        return list("tczyx")
    names = [str(a.get("name") if isinstance(a, dict) else a).lower() for a in axes]
    # NGFF names the channel axis by its type; "c" is only the usual name ("channel", "ch")
    typed = [i for i, a in enumerate(axes) if isinstance(a, dict) and a.get("type") == "channel"]
    if "c" not in names and len(typed) == 1:
        names[typed[0]] = "c"
    return names


def _ngff_mpp(ms: dict, ds0: dict, axes: list[str]) -> float | None:
    """Level-0 µm/px along x, or None when the x axis has no (known) unit."""
    ax = ms.get("axes") or []
    xi = axes.index("x")
    unit = ax[xi].get("unit") if xi < len(ax) and isinstance(ax[xi], dict) else None
    if unit is None or unit not in UM_PER_UNIT:
        return None
    scale = 1.0
    found = False
    for transforms in (
        ds0.get("coordinateTransformations") or [],
        ms.get("coordinateTransformations") or [],
    ):
        for t in transforms:
            if t.get("type") == "scale" and "scale" in t:
                scale *= float(t["scale"][xi])
                found = True
    if not found or scale <= 0:
        return None
    return scale * UM_PER_UNIT[unit]
