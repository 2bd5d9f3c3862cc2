"""Slide readers behind one interface: ``open_slide(path) -> Slide``.

Backends register themselves in a small registry (name -> class with a
``can_open(path)`` classmethod); ``open_slide`` picks the first that accepts the
file in priority order, or the one named by ``backend=``. A backend that declines files
another one owns (``fallback_after = ("openslide",)``) gets them, through its
``can_open_fallback(path)``, when that one fails, before lower priorities are tried.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsi_mil.errors import SlideError
from wsi_mil.slides.base import PAD_VALUE, Slide, TileGrid
from wsi_mil.slides.table import SlideEntry, read_slide_table, slide_id_from_path, write_slide_table

__all__ = [
    "PAD_VALUE",
    "Slide",
    "SlideEntry",
    "TileGrid",
    "available_backends",
    "open_slide",
    "read_slide_table",
    "register_backend",
    "slide_id_from_path",
    "write_slide_table",
]

log = logging.getLogger(__name__)

# name -> (priority, class); lower priority is tried first
_REGISTRY: dict[str, tuple[int, type[Slide]]] = {}


def register_backend(name: str, priority: int) -> Callable[[type[Slide]], type[Slide]]:
    """Class decorator: ``@register_backend("tiff", priority=10)``."""

    def deco(cls: type[Slide]) -> type[Slide]:
        cls.backend = name
        _REGISTRY[name] = (priority, cls)
        return cls

    return deco


def available_backends() -> list[str]:
    _load_backends()
    return [n for n, _ in sorted(_REGISTRY.items(), key=lambda kv: kv[1][0])]


def _load_backends() -> None:
    # Imported lazily so `import wsi_mil.slides` stays cheap; each module registers itself.
    from wsi_mil.slides import backends  # noqa: F401


def open_slide(
    path: str | os.PathLike,
    backend: str | None = None,
    mpp: float | None = None,
    significant_bits: int | None = None,
) -> Slide:
    """Open any supported image. ``backend`` forces one ("openslide", "tiff", "zarr", "image").

    ``mpp`` overrides the level-0 microns per pixel from the file; ``significant_bits`` the
    bit depth of integer samples wider than 8 bits (:meth:`Slide.set_significant_bits`).
    Raises :class:`SlideError` with one line naming the file and the problem.
    """
    slide = _open_slide(path, backend, mpp)
    if significant_bits:
        try:
            slide.set_significant_bits(significant_bits)
        except BaseException:
            slide.close()
            raise
    return slide


def _open_slide(path: str | os.PathLike, backend: str | None, mpp: float | None) -> Slide:
    _load_backends()
    p = Path(path)
    if not p.exists():
        raise SlideError(
            f"{p}: file not found",
            "check the path (relative paths in a slide table resolve against the CSV's folder)",
        )
    if not (p.is_file() or p.is_dir()):
        # a FIFO would block the first reader that opens it (OpenSlide's format sniffing) forever
        raise SlideError(
            f"{p}: not a regular file ({_file_kind(p)})",
            "give the path of a slide file, or of a slide folder (OME-Zarr, MRXS)",
        )
    if p.is_file() and p.stat().st_size == 0:
        raise SlideError(
            f"{p}: the file is empty (0 bytes)",
            "copy or export it again: an interrupted copy or download leaves empty files",
        )
    if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
        raise SlideError(
            f"{p}: slide mpp override {mpp} is not a positive finite number",
            "give the level-0 microns per pixel, e.g. --slide-mpp 0.25",
        )
    if backend is not None and backend != "auto":
        if backend not in _REGISTRY:
            raise SlideError(
                f"unknown backend {backend!r}", f"choose one of: {', '.join(available_backends())}"
            )
        cls = _REGISTRY[backend][1]
        try:
            return cls(p, mpp=mpp)
        except SlideError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SlideError(
                f"{p}: backend {backend!r} cannot read it: {_short(e)}",
                "try another --backend or leave it on auto",
            ) from None
    failures: list[tuple[str, SlideError]] = []
    ordered = sorted(_REGISTRY.items(), key=lambda kv: kv[1][0])
    tried: set[str] = set()
    for name, (_, cls) in ordered:
        if not _attempt(name, lambda cls=cls: cls.can_open(p), p, failures):
            continue
        tried.add(name)
        slide = _attempt(name, lambda cls=cls: cls(p, mpp=mpp), p, failures)
        if slide is not None:
            return slide
        # a backend that declined the file in favour of this one may still read it
        for fname, (_, fcls) in ordered:
            if fname in tried or name not in getattr(fcls, "fallback_after", ()):
                continue
            if not fcls.can_open_fallback(p):  # type: ignore[attr-defined]
                continue
            tried.add(fname)
            slide = _attempt(fname, lambda fcls=fcls: fcls(p, mpp=mpp), p, failures)
            if slide is not None:
                log.warning(
                    "%s: the %s backend cannot read it (%s); read with the %s backend instead",
                    p,
                    name,
                    _reason(failures[-1][1], p),
                    fname,
                )
                return slide
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        # several backends accepted the file type but none could read it: one line with each reason
        reasons: list[str] = []
        for name, e in failures:
            msg = _reason(e, p)
            if not any(msg == r.split(": ", 1)[-1] for r in reasons):
                reasons.append(f"{name}: {msg}")
        raise SlideError(
            f"{p}: cannot read slide ({'; '.join(reasons)})",
            failures[0][1].hint or "the file may be truncated or corrupt",
        )
    if p.is_dir():
        raise SlideError(
            f"{p}: unknown or unsupported format (a folder, but not an OME-Zarr image)",
            "give one slide file in it (tile and the other stages take globs, e.g. "
            f"'{p / '*.svs'}'), or an OME-Zarr folder",
        )
    raise SlideError(
        f"{p}: unknown or unsupported format",
        "supported: SVS/NDPI/MRXS/SCN/VMS/BIF, pyramidal TIFF/OME-TIFF, OME-Zarr, JPEG/PNG/BMP/TIFF",
    )


def _attempt(
    name: str, call: Callable[[], Any], p: Path, failures: list[tuple[str, SlideError]]
) -> Any:
    """``call()`` (backend ``name``'s ``can_open`` or constructor on ``p``), or None with the
    reason appended to ``failures``."""
    try:
        return call()
    except SlideError as e:
        failures.append((name, e))
    except Exception as e:  # noqa: BLE001
        failures.append(
            (name, SlideError(f"{p}: {_short(e)}", "the file may be truncated or corrupt"))
        )
    return None


def _reason(e: SlideError, p: Path) -> str:
    """A backend's error message without the leading ``"<path>: "``."""
    return e.message[len(str(p)) + 2 :] if e.message.startswith(f"{p}: ") else e.message


def _file_kind(p: Path) -> str:
    """What a path that is neither a regular file nor a folder is, in words."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return "cannot stat it"
    for test, name in (
        (stat.S_ISFIFO, "a FIFO / named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file or folder"


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]
