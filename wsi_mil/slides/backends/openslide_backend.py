"""Vendor formats through OpenSlide: SVS, NDPI, MRXS, SCN, VMS, BIF, Philips TIFF, generic tiled TIFF.

``read_region`` returns OpenSlide's RGBA composited over white (transparent areas,
e.g. outside MRXS scan regions, become white like glass).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slides import register_backend
from wsi_mil.slides.backends._util import is_tiff_file, lower_name, to_rgb
from wsi_mil.slides.base import Slide, TileGrid

# Suffixes OpenSlide owns: even when it cannot open such a file we let it report why.
VENDOR_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")


@register_backend("openslide", priority=20)
class OpenSlideSlide(Slide):
    """Wraps ``openslide.OpenSlide``; levels, downsamples and mpp are OpenSlide's own."""

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if lower_name(path).endswith(VENDOR_SUFFIXES):
            return True
        try:
            import openslide

            return openslide.OpenSlide.detect_format(str(path)) is not None
        except Exception:  # noqa: BLE001
            return False

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import openslide

        super().__init__(path, mpp)
        if self.path.is_file() and is_tiff_file(self.path):
            # OpenSlide opens truncated TIFFs lazily and fails only when a missing tile is read
            from wsi_mil.slides.backends.tiff_backend import check_tiff_extents

            check_tiff_extents(self.path)
        try:
            self._os = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(
                f"{self.path}: OpenSlide does not recognise this file as a slide",
                "it may be corrupt, not a slide, or have the wrong extension",
            ) from None
        except openslide.OpenSlideError as e:
            raise SlideError(
                f"{self.path}: OpenSlide cannot open it: {e}",
                "the file may be truncated or corrupt",
            ) from None
        props = self._os.properties
        self.vendor = props.get("openslide.vendor", "")
        self._native_mpp = _float(props.get("openslide.mpp-x"))
        self._dims = [(int(w), int(h)) for w, h in self._os.level_dimensions]
        self._ds = [float(d) for d in self._os.level_downsamples]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self._dims

    @property
    def level_downsamples(self) -> list[float]:
        return self._ds

    @property
    def native_mpp(self) -> float | None:
        return self._native_mpp

    def tile_grid(self, level: int) -> TileGrid | None:
        p = self._os.properties
        tw, th = (
            p.get(f"openslide.level[{level}].tile-width"),
            p.get(f"openslide.level[{level}].tile-height"),
        )
        if tw is None or th is None:
            return None
        return TileGrid(int(tw), int(th))

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        ds = self._ds[level]
        x0, y0 = int(round(lx * ds)), int(round(ly * ds))
        rgba = np.asarray(self._os.read_region((x0, y0), level, (w, h)))
        # openslide-python returns un-premultiplied RGBA; transparent -> white
        return to_rgb(rgba, alpha="straight")

    def properties(self) -> dict:
        d = super().properties()
        d["vendor"] = self.vendor
        return d

    def close(self) -> None:
        if getattr(self, "_os", None) is not None:
            self._os.close()
            self._os = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _float(v: str | None) -> float | None:
    try:
        f = float(v) if v is not None else None
    except ValueError:
        return None
    return f if f and f > 0 else None
