"""Backend modules; importing each registers it with ``wsi_mil.slides``.

Automatic choice (lower priority first, each backend's ``can_open`` decides):
zarr (5) for OME-Zarr folders/zips; tiff (10) for OME-TIFF and for TIFFs OpenSlide
does not recognise as a vendor format (generic pyramidal TIFF, SubIFD pyramids,
strip TIFFs); openslide (20) for vendor formats (SVS/NDPI/MRXS/SCN/...); image (30)
for JPEG/PNG/BMP and anything else Pillow identifies. If a backend fails to open a
file the next one that accepts it is tried.

Why tiff before openslide for generic pyramidal TIFFs: both return identical pixels
(tests/slides/test_tiff_vs_openslide.py), but the tifffile backend reads ~4x faster
(bench/slide_readers.py: random patches, tile-aligned windows and thumbnails), also
reads SubIFD pyramids, planar/16-bit/gray data, and is safe to share across threads.
TIFFs that OpenSlide recognises as a vendor format (Aperio SVS, Hamamatsu NDPI, Leica
SCN, Philips, Ventana) stay with OpenSlide, which knows their quirks.
"""

from wsi_mil.slides.backends import (  # noqa: F401
    image_backend,
    openslide_backend,
    tiff_backend,
    zarr_backend,
)
