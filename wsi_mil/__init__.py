"""wsi-mil: multiple-instance learning on gigapixel images."""

__version__ = "0.1.0"
