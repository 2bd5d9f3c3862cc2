"""Plain single-level images (JPEG, PNG, BMP, GIF, WebP, non-pyramidal TIFF) held in memory.

Opening reads only the header; the pixels are decoded on the first read and kept
(fine for e.g. the seed's 4096 x 4096 JPEGs). Images larger than
:data:`MAX_PIXELS` are refused with a hint to convert them to a pyramidal TIFF.
mpp is None unless the caller overrides it (JPEG/PNG DPI is not a microscope
calibration). EXIF orientation is applied.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slides import register_backend
from wsi_mil.slides.backends._util import (
    TIFF_SUFFIXES,
    first_line,
    is_tiff_file,
    lower_name,
    quiet_readers,
    to_rgb,
    to_uint8,
)
from wsi_mil.slides.base import Slide

#: largest image (pixels) decoded in memory: 400 MP = 1.2 GB of RGB
MAX_PIXELS = 400_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".jp2", ".j2k")


@contextlib.contextmanager
def _bomb_limit():
    """Pillow's decompression-bomb guard at our own limit (its default, 89 MP, is below slide sizes)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _sniff_pil(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format is not None
    except Exception:  # noqa: BLE001
        return False


@register_backend("image", priority=30)
class ImageSlide(Slide):
    """One level, decoded lazily into memory with Pillow (tifffile for TIFFs Pillow cannot read)."""

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if not path.is_file():
            return False
        name = lower_name(path)
        if name.endswith(IMAGE_SUFFIXES) or name.endswith(TIFF_SUFFIXES) or is_tiff_file(path):
            return True
        return _sniff_pil(path)  # unknown suffix: accept anything Pillow identifies

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        from PIL import Image

        super().__init__(path, mpp)
        self._img: np.ndarray | None = None
        self._lock = threading.Lock()
        if not self.path.is_file():
            raise SlideError(f"{self.path}: not a file")
        if is_tiff_file(self.path):
            from wsi_mil.slides.backends.tiff_backend import check_tiff_extents

            check_tiff_extents(self.path)
        try:
            with quiet_readers(), _bomb_limit(), Image.open(self.path) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
                self.format = im.format
        except Exception as e:  # noqa: BLE001
            if is_tiff_file(self.path):
                (w, h), orientation, self.format = self._tiff_size(), 1, "TIFF"
            else:
                raise SlideError(
                    f"{self.path}: not a readable image ({first_line(e)})",
                    "supported: JPEG/PNG/BMP/TIFF and the slide formats",
                ) from None
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        if w * h > MAX_PIXELS:
            raise SlideError(
                f"{self.path}: {w} x {h} px is too large for the in-memory image backend (limit {MAX_PIXELS:,} px)",
                "convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)",
            )
        self._size = (int(w), int(h))

    def _tiff_size(self) -> tuple[int, int]:
        import tifffile

        try:
            with quiet_readers(), tifffile.TiffFile(self.path) as tf:
                p = tf.series[0].levels[0].pages[0]
                return int(p.imagewidth), int(p.imagelength)
        except Exception as e:  # noqa: BLE001
            raise SlideError(
                f"{self.path}: not a readable TIFF ({first_line(e)})",
                "the file may be truncated or corrupt",
            ) from None

    def _pixels(self) -> np.ndarray:
        with self._lock:
            if self._img is None:
                self._img = self._decode()
                if self._img.shape[1::-1] != self._size:
                    raise SlideError(
                        f"{self.path}: decoded size {self._img.shape[1::-1]} differs from the header's {self._size}"
                    )
            return self._img

    def _decode(self) -> np.ndarray:
        from PIL import Image, ImageOps

        try:
            with quiet_readers(), _bomb_limit(), Image.open(self.path) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA") or (
                    im.mode == "P" and "transparency" in im.info
                ):
                    rgba = np.asarray(im.convert("RGBA"))
                    return to_rgb(rgba, alpha="straight")
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    a = np.asarray(im)
                    a = a.astype(np.uint16) if im.mode != "I" else a
                    return to_rgb(to_uint8(a, self.significant_bits))
                return np.ascontiguousarray(np.asarray(im.convert("RGB")))
        except SlideError:
            raise
        except Exception:  # noqa: BLE001
            if not is_tiff_file(self.path):
                raise
        import tifffile

        with quiet_readers():
            a = tifffile.imread(self.path, series=0, level=0)
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)
        return to_rgb(to_uint8(a, self.significant_bits))

    def set_significant_bits(self, bits: int) -> None:
        super().set_significant_bits(bits)
        with self._lock:
            self._img = None  # decoded with the old mapping

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [self._size]

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        return self._pixels()[ly : ly + h, lx : lx + w].copy()

    def close(self) -> None:
        self._img = None
