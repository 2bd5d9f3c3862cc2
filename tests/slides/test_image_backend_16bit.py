"""16-bit PNGs (and wide plain TIFFs) in the image backend: read at full depth and mapped
to 8 bits like the other backends (top significant bits, else the top 8 of 16).

Pillow opens a 16-bit RGB/RGBA/grey+alpha PNG as 8-bit, keeping only the high byte, so
``--significant-bits 12`` had no effect on them and 12-bit camera data came out dark.
"""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_mil.errors import SlideError
from wsi_mil.slides import open_slide
from wsi_mil.slides.backends import image_backend
from wsi_mil.tiling import PatchStore


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """``png`` with an extra ancillary chunk just before its first IDAT."""
    i = png.index(b"IDAT") - 4
    return png[:i] + _chunk(kind, data) + png[i:]


def _png16(path: Path, a: np.ndarray, extra: tuple[bytes, bytes] | None = None) -> Path:
    assert a.dtype == np.uint16
    data = imagecodecs.png_encode(np.ascontiguousarray(a))
    assert data[24] == 16  # bit depth in IHDR
    path.write_bytes(_with_chunk(data, *extra) if extra else data)
    return path


def _png16_interlaced(path: Path, a: np.ndarray) -> Path:
    """Adam7-interlaced 16-bit PNG (no filtering); imagecodecs only writes progressive ones."""
    h, w, c = a.shape
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
              (0, 1, 1, 2)]  # fmt: skip
    raw = b"".join(
        b"\0" + row.astype(">u2").tobytes()
        for x0, y0, dx, dy in passes
        if a[y0::dy, x0::dx].size
        for row in a[y0::dy, x0::dx]
    )
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 1)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )
    return path


def _camera_rgb(h: int = 90, w: int = 130, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint16 holding 12-bit values (0..4095), exact corner values for the maths."""
    a = np.random.default_rng(seed).integers(0, 4096, (h, w, 3), dtype=np.uint16)
    a[0, :4] = [[4095, 2048, 0], [16, 15, 4080], [4095, 4095, 4095], [0, 0, 0]]
    return a


def _read_all(path: Path, **kw) -> np.ndarray:
    with open_slide(path, **kw) as s:
        assert s.backend == kw.get("backend", "image")
        w, h = s.dimensions
        return s.read_region(0, 0, 0, w, h)


def test_rgb16_png_maps_the_top_significant_bits(tmp_path):
    a = _camera_rgb()
    path = _png16(tmp_path / "cam.png", a)
    got12 = _read_all(path, significant_bits=12)
    assert got12[0, :4].tolist() == [[255, 128, 0], [1, 0, 255], [255, 255, 255], [0, 0, 0]]
    np.testing.assert_array_equal(got12, (a >> 4).astype(np.uint8))
    # no bits: the stored width, the top 8 of 16 (nearly black for 12-bit data)
    np.testing.assert_array_equal(_read_all(path), (a >> 8).astype(np.uint8))
    # bits wider than 16 keep the stored 16; exactly 16 likewise
    np.testing.assert_array_equal(_read_all(path, significant_bits=24), (a >> 8).astype(np.uint8))
    full = (a.astype(np.uint32) * 16).astype(np.uint16)
    np.testing.assert_array_equal(
        _read_all(_png16(tmp_path / "full.png", full), significant_bits=16),
        (full >> 8).astype(np.uint8),
    )


def test_bits_beyond_the_data_clamp_to_white(tmp_path):
    """10 significant bits declared for 12-bit data: values past 1023 clamp to 255."""
    a = _camera_rgb()
    got = _read_all(_png16(tmp_path / "c.png", a), significant_bits=10)
    np.testing.assert_array_equal(got, np.minimum(a >> 2, 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha16_is_composited_like_8bit_alpha(tmp_path, mode):
    """RGBA / grey+alpha 16-bit: colour by the significant bits, alpha (full range in PNG) by
    its top 8 bits, then composited over white exactly as the 8-bit PNG of those values."""
    a = _camera_rgb(seed=1)
    colour = a if mode == "RGBA" else a[..., :1]
    alpha = np.full(a.shape[:2] + (1,), 65535, np.uint16)
    alpha[:30, :40] = 0  # transparent corner -> white
    alpha[30:60] = np.random.default_rng(2).integers(0, 65536, (30, a.shape[1], 1))
    path = _png16(tmp_path / "a16.png", np.concatenate([colour, alpha], axis=2))
    as8 = np.concatenate([colour >> 4, alpha >> 8], axis=2).astype(np.uint8)
    ref8 = tmp_path / "a8.png"
    Image.fromarray(as8).save(ref8)  # RGBA or LA
    got = _read_all(path, significant_bits=12)
    np.testing.assert_array_equal(got, _read_all(ref8))
    assert (got[:30, :40] == 255).all()
    np.testing.assert_array_equal(got[60:], np.broadcast_to(as8[60:, :, :-1], got[60:].shape))


def test_gray16_png_and_exif_orientation(tmp_path):
    a = _camera_rgb()
    grey = a[..., 0]
    np.testing.assert_array_equal(
        _read_all(_png16(tmp_path / "g.png", grey), significant_bits=12),
        np.repeat((grey >> 4).astype(np.uint8)[..., None], 3, axis=2),
    )
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = _png16(tmp_path / f"o{orientation}.png", a, (b"eXIf", exif.tobytes()[6:]))
        ref = Image.fromarray((a >> 4).astype(np.uint8))
        ref.save(tmp_path / f"o{orientation}_8.png", exif=exif)
        got = _read_all(path, significant_bits=12)
        assert got.shape[:2] == (a.shape[:2] if orientation == 3 else a.shape[1::-1])
        np.testing.assert_array_equal(got, _read_all(tmp_path / f"o{orientation}_8.png"))


def test_trns_colour_key_is_ignored_like_8bit(tmp_path):
    """A tRNS colour key on a 16-bit RGB PNG: ignored, as on 8-bit RGB/grey PNGs."""
    a = _camera_rgb()
    key = struct.pack(">HHH", *(int(v) for v in a[5, 5]))
    got = _read_all(_png16(tmp_path / "t.png", a, (b"tRNS", key)), significant_bits=12)
    np.testing.assert_array_equal(got, (a >> 4).astype(np.uint8))


def test_interlaced_rgb16_png(tmp_path):
    a = _camera_rgb(37, 53)
    got = _read_all(_png16_interlaced(tmp_path / "i.png", a), significant_bits=12)
    np.testing.assert_array_equal(got, (a >> 4).astype(np.uint8))


def test_mapping_in_bands_equals_whole(tmp_path, monkeypatch):
    """Rows are mapped a band at a time (bounded int64 temporaries); band edges change nothing."""
    a = _camera_rgb(seed=3)
    alpha = np.random.default_rng(4).integers(0, 65536, a.shape[:2] + (1,), dtype=np.uint16)
    path = _png16(tmp_path / "b.png", np.concatenate([a, alpha], axis=2))
    whole = _read_all(path, significant_bits=12)
    monkeypatch.setattr(image_backend, "BAND_BYTES", a.shape[1] * 4 * 8 * 7)  # 7-row bands
    np.testing.assert_array_equal(_read_all(path, significant_bits=12), whole)


def test_set_significant_bits_after_a_read_remaps(tmp_path):
    a = _camera_rgb()
    with open_slide(_png16(tmp_path / "c.png", a)) as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 130, 90), (a >> 8).astype(np.uint8))
        s.set_significant_bits(12)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 130, 90), (a >> 4).astype(np.uint8))


def test_corrupt_16bit_png_is_a_slide_error(tmp_path):
    data = imagecodecs.png_encode(_camera_rgb(200, 300))
    start = data.index(b"IDAT") - 4
    (n,) = struct.unpack(">I", data[start : start + 4])
    idat = bytearray(data[start + 8 : start + 8 + n])
    idat[100:116] = b"x" * 16  # damaged deflate stream under a valid chunk CRC
    bad = data[:start] + _chunk(b"IDAT", bytes(idat)) + data[start + 12 + n :]
    (tmp_path / "bad.png").write_bytes(bad)
    with pytest.raises(SlideError, match="bad.png: .*not a readable PNG") as e:
        _read_all(tmp_path / "bad.png", significant_bits=12)
    assert e.value.hint == "the file may be truncated or corrupt"
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="cut.png: PNG is truncated") as e:
        open_slide(tmp_path / "cut.png")  # refused on opening, as Pillow refuses 8-bit ones
    assert e.value.hint == "the file may be truncated or corrupt"


@pytest.mark.parametrize(
    ("photometric", "samples", "extra"),
    [("rgb", 3, None), ("rgb", 4, "unassalpha"), ("rgb", 4, "assocalpha"),
     ("minisblack", 1, None), ("miniswhite", 1, None)],
)  # fmt: skip
def test_wide_plain_tiff_in_the_image_backend_matches_the_tiff_backend(
    tmp_path, photometric, samples, extra
):
    """A 16-bit strip TIFF read by the image backend (``--backend image``, or when the tiff
    backend refuses a file) maps like the tiff backend, with and without bits."""
    a = np.random.default_rng(5).integers(0, 4096, (70, 90, samples), dtype=np.uint16)
    if extra:
        a[:20, :, 3] = 0
        a[20:, :, 3] = 4095
    kw = {"extrasamples": [extra]} if extra else {}
    path = tmp_path / "w.tif"
    tifffile.imwrite(path, a if samples > 1 else a[..., 0], photometric=photometric, **kw)
    for bits in (None, 12):
        np.testing.assert_array_equal(
            _read_all(path, backend="image", significant_bits=bits),
            _read_all(path, backend="tiff", significant_bits=bits),
        )
    if photometric == "rgb" and not extra:
        np.testing.assert_array_equal(
            _read_all(path, backend="image", significant_bits=12), (a >> 4).astype(np.uint8)
        )


def test_8bit_images_unchanged(tmp_path):
    """8-bit PNG/TIFF files do not take the 16-bit path."""
    a = np.random.default_rng(6).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(a[..., :3]).save(tmp_path / "b.tif")
    with open_slide(tmp_path / "a.png", significant_bits=12) as s:
        ref = np.asarray(Image.open(tmp_path / "a.png").convert("RGBA"))
        al = ref[..., 3:].astype(np.uint16)
        want = ((ref[..., :3] * al + 255 * (255 - al) + 127) // 255).astype(np.uint8)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 50, 40), want)
    np.testing.assert_array_equal(_read_all(tmp_path / "b.tif", backend="image"), a[..., :3])


def test_tile_significant_bits_on_rgb16_png(tmp_path, cli):
    a = _camera_rgb(300, 410, seed=7)
    path = _png16(tmp_path / "cam.png", a)
    table = tmp_path / "s.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "path"), ("cam", str(path))])
    work = tmp_path / "w"
    r = cli("-q", "tile", "--slides", str(table), "--work", str(work), "--patch-size", "64",
            "--significant-bits", "12", "--tissue", "none")  # fmt: skip
    assert r.returncode == 0, r.stderr
    store = PatchStore.open(work / "patches" / "cam.zarr")
    assert len(store) == 7 * 5 and store.attrs["significant_bits"] == 12
    px = store.pixels(0, len(store))
    with open_slide(path, significant_bits=12) as s:
        for i, (x, y) in enumerate(store.coords):
            np.testing.assert_array_equal(px[i], s.read_region(0, int(x), int(y), 64, 64))
    x, y = (int(v) for v in store.coords[0])
    np.testing.assert_array_equal(px[0], (a[y : y + 64, x : x + 64] >> 4).astype(np.uint8))
    assert px.max() > 180  # not the nearly black top 8 of 16 bits


def test_8bit_png_orientation_after_the_pixels_without_decoding_at_open(tmp_path, monkeypatch):
    """An eXIf chunk after IDAT (allowed by the PNG spec) still rotates an 8-bit PNG, found
    by walking the chunk headers: opening the slide decodes no pixels."""
    a = _camera_rgb().astype(np.uint8)
    plain = tmp_path / "plain.png"
    Image.fromarray(a).save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = plain.read_bytes()
    i = data.index(b"IEND") - 4
    late = tmp_path / "late.png"
    late.write_bytes(data[:i] + _chunk(b"eXIf", exif.tobytes()[6:]) + data[i:])

    from PIL import ImageFile

    def no_decode(self, *args, **kwargs):
        raise AssertionError("the PNG was decoded while the slide was opened")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decode)
        with open_slide(late) as s:
            assert s.dimensions == (a.shape[0], a.shape[1])  # rotated: width <-> height
    np.testing.assert_array_equal(_read_all(late), np.ascontiguousarray(np.rot90(a, -1)))


def test_float_tiff_is_still_read_by_pillow(tmp_path):
    """Only unsigned integer samples wider than 8 bits go to tifffile; a float32 TIFF of
    0..255 values keeps Pillow's mapping (not taken for [0, 1] floats and made white)."""
    g = np.tile(np.linspace(0, 200, 64, dtype=np.float32), (48, 1))
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, g)
    got = _read_all(path, backend="image")
    assert got.shape == (48, 64, 3) and got[:, 0].max() == 0 and 190 <= got[:, -1].min() <= 200
