"""Backend modules; importing each registers it with ``wsi_mil.slides``."""
