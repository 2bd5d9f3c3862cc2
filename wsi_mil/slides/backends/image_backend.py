"""Plain single-level images (JPEG, PNG, BMP, GIF, WebP, non-pyramidal TIFF) held in memory.

Opening reads only the header; the pixels are decoded on the first read and kept
(fine for e.g. the seed's 4096 x 4096 JPEGs). Images larger than
:data:`MAX_PIXELS` are refused with a hint to convert them to a pyramidal TIFF.
mpp is None unless the caller overrides it (JPEG/PNG DPI is not a microscope
calibration). EXIF orientation is applied.

16-bit PNGs (grey, grey+alpha, RGB, RGBA) are decoded at full depth with imagecodecs
(Pillow keeps only the high byte of 16-bit colour PNGs) and TIFFs with samples wider than
8 bits with tifffile; both map to 8 bits like the other backends (``to_uint8``: the top
:attr:`Slide.significant_bits`, else the top 8 stored bits), a band of rows at a time.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from pathlib import Path

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slides import register_backend
from wsi_mil.slides.backends._util import (
    TIFF_SUFFIXES,
    expand_low_bits,
    first_line,
    is_tiff_file,
    lower_name,
    quiet_readers,
    tiff_alpha,
    to_rgb,
    to_uint8,
)
from wsi_mil.slides.base import Slide

#: largest image (pixels) decoded in memory: 400 MP = 1.2 GB of RGB (a 16-bit PNG needs up
#: to ~4x that while it is decoded: its 16-bit samples, then the 8-bit RGB)
MAX_PIXELS = 400_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".jp2", ".j2k")
#: int64 bytes per band when wide samples are mapped to uint8 (``to_uint8`` works in int64)
BAND_BYTES = 16 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def _png_header(path: Path) -> tuple[int, int, int, int] | None:
    """(bit depth, colour type, width, height) from a PNG's IHDR chunk; None if not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", head[16:24])
    return head[24], head[25], w, h


def _png_orientation(path: Path) -> int:
    """EXIF orientation from a PNG's eXIf chunk (1 without one), walking the chunk headers.

    Pillow's ``getexif()`` decodes the whole PNG to look for eXIf after the pixels; this
    seeks past them. A file that ends before its IEND chunk is refused as truncated."""
    exif = None
    # unbuffered: a buffered read after each seek would fetch a whole block (MiBs on Lustre)
    with open(path, "rb", buffering=0) as f:
        f.seek(8)
        while True:
            head = f.read(8)  # length, type
            if len(head) < 8:
                raise SlideError(
                    f"{path}: PNG is truncated (it ends before its IEND chunk)",
                    "the file may be truncated or corrupt",
                )
            n, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            if kind == b"eXIf" and exif is None:
                exif = f.read(n)
                n = 0
            f.seek(n + 4, os.SEEK_CUR)  # data and CRC
    if not exif:
        return 1
    from PIL import Image

    try:
        info = Image.Exif()
        info.load(exif)
        orientation = int(info.get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged eXIf chunk: Pillow would ignore it too
        return 1
    return orientation if orientation in range(1, 9) else 1


def _wide_to_rgb(
    a: np.ndarray,
    bits: int | None,
    alpha: str | None = None,
    alpha_bits: int | None = None,
    invert: bool = False,
) -> np.ndarray:
    """(h, w[, c]) samples -> (h, w, 3) uint8: ``to_uint8(colour, bits)``, then ``to_rgb``.

    A band of rows at a time, so the int64 temporaries stay small for a 400 MP image.
    ``alpha`` ("straight"/"premultiplied"): the last of 2 or 4 samples is alpha, mapped
    with ``alpha_bits`` and composited over white (grey+alpha as grey, grey, grey, alpha);
    ``invert``: MinIsWhite samples."""
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, c = a.shape
    if c not in (2, 4):
        alpha = None
    out = np.empty((h, w, 3), np.uint8)
    rows = max(1, BAND_BYTES // max(1, w * c * 8))
    for y in range(0, h, rows):
        band = a[y : y + rows]
        if alpha is None:
            b8 = to_uint8(band, bits)
        else:
            colour = to_uint8(band[:, :, : c - 1], bits)
            if c == 2:
                colour = np.repeat(colour, 3, axis=2)
            b8 = np.concatenate([colour, to_uint8(band[:, :, c - 1 :], alpha_bits)], axis=2)
        if invert:
            b8 = 255 - b8
        out[y : y + rows] = to_rgb(b8, alpha)
    return out


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation applied as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        a = a[:, ::-1]
    elif orientation == 3:
        a = a[::-1, ::-1]
    elif orientation == 4:
        a = a[::-1]
    elif orientation == 5:
        a = a.swapaxes(0, 1)
    elif orientation == 6:
        a = a.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:
        a = a[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        a = a.swapaxes(0, 1)[::-1]
    else:
        return a
    return np.ascontiguousarray(a)


def _wide_tiff(im: object) -> bool:
    """A TIFF Pillow opened whose grey/RGB samples are wider than 8 bits (Pillow keeps only
    the high byte of 16-bit RGB): tifffile reads those at full depth."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return False
    bps = tags.get(258, 1)
    bps = bps if isinstance(bps, tuple) else (bps,)
    fmt = tags.get(339, 1)  # SampleFormat: 1 unsigned integer (floats stay with Pillow)
    fmt = fmt if isinstance(fmt, tuple) else (fmt,)
    return max(bps, default=1) > 8 and tags.get(262) in (0, 1, 2) and set(fmt) == {1}


@register_backend("image", priority=30)
class ImageSlide(Slide):
    """One level, decoded lazily into memory with Pillow (imagecodecs for 16-bit PNGs, tifffile
    for TIFFs Pillow cannot read or whose samples are wider than 8 bits)."""

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
        self._orientation = 1
        self._png: tuple[int, int] | None = None  # 16-bit PNG: (bit depth, colour type)
        if not self.path.is_file():
            raise SlideError(f"{self.path}: not a file")
        if is_tiff_file(self.path):
            from wsi_mil.slides.backends.tiff_backend import check_tiff_extents

            check_tiff_extents(self.path)
        png = _png_header(self.path)
        if png is not None and png[0] == 16 and png[1] in (0, 2, 4, 6) and png[2] and png[3]:
            # decoded at full depth with imagecodecs (_decode_png16); Pillow is not needed here
            self._png = png[:2]
            (w, h), orientation, self.format = png[2:], _png_orientation(self.path), "PNG"
        else:
            try:
                with quiet_readers(), _bomb_limit(), Image.open(self.path) as im:
                    w, h = im.size
                    # Pillow's getexif() decodes a whole PNG to look past its pixels
                    orientation = (
                        _png_orientation(self.path) if png else im.getexif().get(0x0112, 1)
                    )
                    self.format = im.format
            except Exception as e:  # noqa: BLE001
                if is_tiff_file(self.path):
                    (w, h), orientation, self.format = self._tiff_size(), 1, "TIFF"
                else:
                    raise SlideError(
                        f"{self.path}: not a readable image ({first_line(e)})",
                        "supported: JPEG/PNG/BMP/TIFF and the slide formats",
                    ) from None
        self._orientation = orientation if orientation in range(1, 9) else 1
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

        if self._png is not None:
            return self._decode_png16()
        try:
            with quiet_readers(), _bomb_limit(), Image.open(self.path) as im:
                if im.format != "TIFF" or not _wide_tiff(im):
                    return self._decode_pil(ImageOps.exif_transpose(im))
        except SlideError:
            raise
        except Exception:  # noqa: BLE001
            if not is_tiff_file(self.path):
                raise
        return self._decode_tiff()

    def _decode_pil(self, im: object) -> np.ndarray:
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = np.asarray(im.convert("RGBA"))
            return to_rgb(rgba, alpha="straight")
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im)
            a = a.astype(np.uint16) if im.mode != "I" else a
            return _wide_to_rgb(a, self.significant_bits)
        return np.ascontiguousarray(np.asarray(im.convert("RGB")))

    def _decode_png16(self) -> np.ndarray:
        """16-bit PNG at full depth (Pillow keeps only the high byte of colour ones)."""
        import imagecodecs

        try:
            a = imagecodecs.png_decode(self.path.read_bytes())
        except Exception as e:  # noqa: BLE001
            raise SlideError(
                f"{self.path}: not a readable PNG ({first_line(e)})",
                "the file may be truncated or corrupt",
            ) from None
        if a.ndim == 2:
            a = a[:, :, None]
        colour_type = self._png[1] if self._png else 0  # (set whenever this is called)
        # libpng turns a tRNS colour key into alpha; 8-bit grey/RGB PNGs ignore it, so do these
        channels = {0: 1, 2: 3}.get(colour_type, a.shape[2])
        alpha = "straight" if colour_type in (4, 6) else None
        # colour: the top significant bits; alpha (PNG: always full range): the top 8 of 16
        rgb = _wide_to_rgb(a[:, :, :channels], self.significant_bits, alpha, alpha_bits=None)
        del a
        return _orient(rgb, self._orientation)

    def _decode_tiff(self) -> np.ndarray:
        """tifffile: TIFFs Pillow cannot read, and grey/RGB samples wider than 8 bits (mapped
        like the tiff backend does: MinIsWhite inverted, RGB extra samples as alpha)."""
        import tifffile

        try:
            with quiet_readers(), tifffile.TiffFile(self.path) as tf:
                series = tf.series[0].levels[0]
                page = series.keyframe
                photometric, spp = int(page.photometric), int(page.samplesperpixel)
                stored_bits = int(page.bitspersample)
                extra = tuple(page.extrasamples or ())
                a = series.asarray()
        except Exception as e:  # noqa: BLE001
            raise SlideError(
                f"{self.path}: not a readable TIFF ({first_line(e)})",
                "the file may be truncated or corrupt",
            ) from None
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)
        if a.dtype.itemsize == 1:  # 8-bit TIFFs Pillow cannot read: as before
            if photometric != 3:  # 2-, 4-bit ... samples: 0..2**bits-1 -> 0..255
                a = expand_low_bits(a, stored_bits)
            return to_rgb(to_uint8(a, self.significant_bits))
        alpha = tiff_alpha(extra) if spp >= 4 and photometric == 2 else None
        if alpha is not None and a.ndim == 3 and a.shape[2] > 4:
            a = a[:, :, :4]
        # as the tiff backend: --significant-bits, else BitsPerSample (e.g. 12 in packed 12-bit)
        bits = self.significant_bits or (stored_bits if stored_bits >= 8 else None)
        rgb = _wide_to_rgb(a, bits, alpha, alpha_bits=bits, invert=photometric == 0)
        return _orient(rgb, self._orientation)

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
