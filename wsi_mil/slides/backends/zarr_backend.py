"""OME-Zarr (OME-NGFF multiscales v0.4 / v0.5; zarr v2 and v3 stores, also zipped).

Levels are the multiscales ``datasets`` in order; level 0 mpp comes from the first
dataset's ``scale`` transform (times any multiscale-wide scale) on the x axis, converted
from the axis ``unit`` to µm (None when the axis has no unit). Axes may be any NGFF
order (``c,y,x``, ``t,c,z,y,x``, ...) and also the non-standard ``y,x,c``; t/z take index 0.
Channels: 3 or more -> channels 0, 1, 2 as RGB (a 4th, e.g. alpha, is ignored); 1 or 2
-> channel 0 as gray, replicated. Samples wider than 8 bits keep their top 8 bits (uint16:
``>> 8``; floats map ``_util.float_white`` of the smallest level to 255: 1.0 for 0..1
data, 255 for 8-bit values). A bioformats2raw layout (image in ``0/``) is followed.
Empty (zero-size) levels and levels whose x and y downsamples differ beyond rounding are
dropped (an empty level 0 is an error); an mpp outside ``_util.MPP_RANGE`` is unknown.
Malformed metadata is a :class:`SlideError` naming the key and what was expected; an HCS
plate (wells of fields) is one too, naming a field image to give instead.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slides import register_backend
from wsi_mil.slides.backends._util import (
    UM_PER_UNIT,
    first_line,
    float_white,
    level_mismatch,
    lower_name,
    to_rgb,
    to_uint8,
    valid_mpp,
)
from wsi_mil.slides.base import Slide, TileGrid

log = logging.getLogger(__name__)

_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs", ".zarray")
#: side (px) of the central square of the smallest level sampled for the range of floats
_FLOAT_SAMPLE_PX = 2048


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
                root = zarr.open_group(self._store, mode="r", path=_zip_group_path(self.path))
            else:
                root = zarr.open_group(str(self.path), mode="r")
        except Exception as e:  # noqa: BLE001
            self.close()
            if _is_zarr_array(self.path) and _looks_like_zarr(self.path.parent):
                raise SlideError(
                    f"{self.path}: a zarr array (one pyramid level), not an OME-Zarr image",
                    f"give the image folder that holds its multiscales metadata, e.g. {self.path.parent}",
                ) from None
            if _is_zarr_array(self.path):
                raise SlideError(
                    f"{self.path}: a plain zarr array, not an OME-Zarr image (no multiscales metadata)",
                    "write it as OME-Zarr (e.g. ome-zarr-py's write_image) or as a TIFF",
                ) from None
            raise SlideError(
                f"{self.path}: not a readable zarr group ({first_line(e)})",
                "an OME-Zarr image is a folder with zarr.json (zarr v3) or .zgroup/.zattrs (zarr v2)",
            ) from None
        try:
            self._read_image(root)
        except BaseException:
            self.close()  # a zipped image's file handle
            raise

    def _read_image(self, root: Any) -> None:
        """Levels, axes, channels and mpp of the OME-Zarr image under ``root``."""
        group, ms, self.ngff_version, key = _find_multiscales(root, self.path)
        if ms is None and (field := _first_plate_field(root)) is not None:
            raise SlideError(
                f"{self.path}: an OME-Zarr HCS plate (wells of images), not one image",
                f"give one field's image folder as the slide, e.g. {self.path / field}",
            )
        if ms is None:
            raise SlideError(
                f"{self.path}: zarr group has no OME-NGFF 'multiscales' metadata (empty or not an OME-Zarr image)",
                "write it with an NGFF writer (ome-zarr, bioformats2raw, `wsi-mil synth --format ome-zarr`)",
            )
        self._axes = _axis_names(ms.get("axes"), self.path, key)
        for a in ("y", "x"):
            if a not in self._axes:
                raise SlideError(f"{self.path}: multiscales axes {self._axes} have no {a!r} axis")
        datasets = ms.get("datasets") or []
        if not datasets:
            raise SlideError(f"{self.path}: multiscales has no datasets (no pyramid levels)")
        _check_datasets(datasets, self.path, key)
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
        if 0 in self._arrays[0].shape:
            raise SlideError(
                f"{self.path}: the image is empty (level 0 array {datasets[0]['path']!r} has "
                f"shape {tuple(self._arrays[0].shape)}, axes {self._axes})",
                "the file was written without pixels, or the writer failed",
            )
        dims = [(int(a.shape[self._xi]), int(a.shape[self._yi])) for a in self._arrays]
        # keep strictly shrinking levels only, not empty, with one downsample in x and y
        self._levels = [0]
        for i in range(1, len(dims)):
            if 0 in self._arrays[i].shape:
                why = f"it is empty (shape {tuple(self._arrays[i].shape)})"
            else:
                why = level_mismatch(dims[0], dims[i])
            if why is not None:
                log.warning(
                    "%s: dropped level array %r (%d x %d px): %s",
                    self.path,
                    datasets[i]["path"],
                    *dims[i],
                    why,
                )
                continue
            if dims[i][0] < dims[self._levels[-1]][0] or dims[i][1] < dims[self._levels[-1]][1]:
                self._levels.append(i)
        self._dims = [dims[i] for i in self._levels]
        self._native_mpp = _ngff_mpp(ms, datasets[0], self._axes, self.path, key)
        n_c = int(self._arrays[0].shape[self._ci]) if self._ci is not None else 1
        self._channels: list[int] = [0, 1, 2] if n_c >= 3 else [0]
        self._float_max = 1.0
        try:
            self._float_max = self._measure_float_max()
        except Exception as e:  # noqa: BLE001 - unreadable chunks fail on read, with their place
            log.debug("%s: float range not measured (%s)", self.path, e)

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
        data = self._samples(level, lx, ly, w, h)
        return to_rgb(to_uint8(data, self.significant_bits, self._float_max))

    def _samples(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """(h, w, channels) stored samples of the window at ``level`` px (lx, ly)."""
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
        return data

    def _measure_float_max(self) -> float:
        """The float sample value that maps to 255 (:func:`float_white`), from the smallest
        level (at most its central :data:`_FLOAT_SAMPLE_PX` square); 1.0 for integer data."""
        if np.dtype(self._arrays[self._levels[-1]].dtype).kind != "f":
            return 1.0
        level = len(self._levels) - 1
        lw, lh = self._dims[level]
        w, h = min(lw, _FLOAT_SAMPLE_PX), min(lh, _FLOAT_SAMPLE_PX)
        return float_white(self._samples(level, (lw - w) // 2, (lh - h) // 2, w, h))

    def properties(self) -> dict:
        d = super().properties()
        d["ngff_version"] = self.ngff_version
        d["axes"] = "".join(self._axes)
        return d

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def _find_multiscales(root: Any, path: Path) -> tuple[Any, dict | None, str | None, str]:
    """(group holding the image, its first multiscales entry, NGFF version, the entry's
    metadata key for messages) or (root, None, None, "").

    Raises :class:`SlideError` naming the key when ``multiscales`` is not a list of objects."""
    for group in _candidate_groups(root):
        attrs = dict(group.attrs)
        if "ome" in attrs and isinstance(attrs["ome"], dict):
            ome = attrs["ome"]
            ms = ome.get("multiscales")
            if ms:
                return (
                    group,
                    _first_multiscale(ms, "ome.multiscales", path),
                    str(ome.get("version", "0.5")),
                    "ome.multiscales[0]",
                )
        ms = attrs.get("multiscales")
        if ms:
            first = _first_multiscale(ms, "multiscales", path)
            return group, first, str(first.get("version", "0.4")), "multiscales[0]"
    return root, None, None, ""


def _zip_group_path(path: Path) -> str:
    """Where the zarr group lies in zip file ``path``: "" (the zip's root, as NGFF's zipped
    OME-Zarr has it), else the shallowest folder with group metadata, as ``zip -r x.zip
    x.zarr`` makes ("x.zarr")."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    folders = {n.rsplit("/", 1)[0] if "/" in n else "" for n in names if _is_meta_name(n)}
    if not folders or "" in folders:
        return ""
    return min(folders, key=lambda f: (f.count("/"), f))


def _is_meta_name(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in ("zarr.json", ".zgroup", ".zattrs")


def _is_zarr_array(path: Path) -> bool:
    """Whether folder ``path`` is a zarr array (v2 ``.zarray``, v3 ``zarr.json`` of an array)."""
    if not path.is_dir():
        return False
    if (path / ".zarray").is_file():
        return True
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("node_type") == "array"


def _ngff_attrs(group: Any) -> dict:
    """A group's NGFF attributes: under ``ome`` (NGFF 0.5) or at the top level (0.4)."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def _first_plate_field(root: Any) -> str | None:
    """Path of the first well's first field image ("A/1/0") when ``root`` is an NGFF HCS
    plate, else None."""
    try:
        plate = _ngff_attrs(root).get("plate")
        if not isinstance(plate, dict):
            return None
        well = str(plate["wells"][0]["path"]).strip("/")
        images = _ngff_attrs(root[well]).get("well", {}).get("images") or [{"path": "0"}]
        return f"{well}/{str(images[0]['path']).strip('/')}"
    except Exception:  # noqa: BLE001 - a plate without wells: the usual message
        return None


def _bad_metadata(path: Path, key: str, got: Any, expected: str) -> SlideError:
    """The error for NGFF metadata ``key`` holding ``got`` where ``expected`` belongs."""
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return SlideError(
        f"{path}: bad OME-NGFF metadata: {key!r} is {type(got).__name__} {shown}, expected {expected}",
        "fix or rewrite the image's metadata with an NGFF writer (see ngff.openmicroscopy.org)",
    )


def _first_multiscale(ms: Any, key: str, path: Path) -> dict:
    if not isinstance(ms, list):
        raise _bad_metadata(path, key, ms, "a list of multiscale objects (one per image)")
    if not isinstance(ms[0], dict):
        raise _bad_metadata(path, f"{key}[0]", ms[0], "an object with 'axes' and 'datasets'")
    return ms[0]


def _check_datasets(datasets: Any, path: Path, key: str) -> None:
    """Raise :class:`SlideError` unless ``datasets`` is a list of objects with a string ``path``."""
    if not isinstance(datasets, list):
        raise _bad_metadata(path, f"{key}.datasets", datasets, "a list of {'path': ...} objects")
    for i, ds in enumerate(datasets):
        if not isinstance(ds, dict) or not isinstance(ds.get("path"), str):
            raise _bad_metadata(
                path,
                f"{key}.datasets[{i}]",
                ds,
                "an object with a string 'path' (the level's array)",
            )


def _candidate_groups(root: Any) -> list[Any]:
    out = [root]
    try:
        sub = root["0"]
        if hasattr(sub, "attrs") and not hasattr(sub, "shape"):  # bioformats2raw: image in 0/
            out.append(sub)
    except Exception:  # noqa: BLE001
        pass
    return out


def _axis_names(axes: Any, path: Path, key: str = "multiscales[0]") -> list[str]:
    if axes is None:  # NGFF <= 0.3 without axes: 5D tczyx
        return list("tczyx")
    if not isinstance(axes, list):
        raise _bad_metadata(
            path, f"{key}.axes", axes, "a list of axis names or {'name': ...} objects"
        )
    for i, a in enumerate(axes):
        if not (isinstance(a, str) or (isinstance(a, dict) and isinstance(a.get("name"), str))):
            raise _bad_metadata(
                path, f"{key}.axes[{i}]", a, "an axis name or a {'name': ...} object"
            )
    names = [str(a.get("name") if isinstance(a, dict) else a).lower() for a in axes]
    # NGFF names the channel axis by its type; "c" is only the usual name ("channel", "ch")
    typed = [i for i, a in enumerate(axes) if isinstance(a, dict) and a.get("type") == "channel"]
    if "c" not in names and len(typed) == 1:
        names[typed[0]] = "c"
    return names


def _ngff_mpp(
    ms: dict, ds0: dict, axes: list[str], path: Path, ms_key: str = "multiscales[0]"
) -> float | None:
    """Level-0 µm/px along x, or None when the x axis has no (known) unit or the scale is not
    a usable value (:func:`valid_mpp`: inf, nan, 0, 1e300, ...).

    Non-square pixels (y scale differs): a warning, and x is kept, like the tiff backend."""
    ax = ms.get("axes") or []
    xi, yi = axes.index("x"), axes.index("y")
    units = [
        ax[i].get("unit") if i < len(ax) and isinstance(ax[i], dict) else None for i in (xi, yi)
    ]
    if units[0] is None or units[0] not in UM_PER_UNIT:
        return None
    scale = [1.0, 1.0]  # x, y
    found = False
    for key, transforms in (
        (f"{ms_key}.datasets[0].coordinateTransformations", ds0.get("coordinateTransformations")),
        (f"{ms_key}.coordinateTransformations", ms.get("coordinateTransformations")),
    ):
        if transforms is None:
            continue
        if not isinstance(transforms, list):
            raise _bad_metadata(path, key, transforms, "a list of transformation objects")
        for j, t in enumerate(transforms):
            if not isinstance(t, dict):
                raise _bad_metadata(path, f"{key}[{j}]", t, "a {'type': ...} object")
            if t.get("type") != "scale" or "scale" not in t:
                continue
            s = t["scale"]
            if not isinstance(s, list) or len(s) != len(axes):
                raise _bad_metadata(
                    path,
                    f"{key}[{j}].scale",
                    s,
                    f"a list of {len(axes)} numbers, one per axis {axes}",
                )
            try:
                scale = [scale[0] * float(s[xi]), scale[1] * float(s[yi])]
            except (TypeError, ValueError):
                raise _bad_metadata(
                    path, f"{key}[{j}].scale", s, f"numbers, one per axis {axes}"
                ) from None
            found = True
    if not found:
        return None
    x = valid_mpp(scale[0] * UM_PER_UNIT[units[0]])
    y_unit = UM_PER_UNIT.get(units[1]) if units[1] is not None else None
    y = valid_mpp(scale[1] * y_unit) if y_unit is not None else None
    if x is not None and y is not None and not math.isclose(x, y, rel_tol=1e-3):
        log.warning(
            "%s: OME-Zarr pixels are not square (x %.6g µm, y %.6g µm): "
            "using x as the slide's µm/px",
            path,
            x,
            y,
        )
    return x
