"""``wsi-mil info``: a slide's levels, sizes, downsamples, mpp, backend and tile grid."""

from __future__ import annotations

import math
import os
from typing import Any

from wsi_mil.slides import open_slide


def slide_info(
    path: str | os.PathLike, backend: str | None = None, mpp: float | None = None
) -> dict:
    """JSON-able summary of a slide (see :meth:`wsi_mil.slides.Slide.properties`).

    Raises :class:`wsi_mil.errors.SlideError` for a missing/unreadable/unsupported file.
    """
    with open_slide(path, backend=backend, mpp=mpp) as slide:
        return _finite(slide.properties())


def _finite(v: Any) -> Any:
    """``v`` with every non-finite float (inf, nan) replaced by None, recursively: the result
    is strict JSON (``json.dumps`` would write ``Infinity``/``NaN``, which JSON parsers reject)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def format_info(info: dict) -> str:
    """Human-readable table of :func:`slide_info`'s result."""
    mpp, native = info.get("mpp"), info.get("native_mpp")
    if mpp is None:
        mpp_s = "unknown (pass --slide-mpp to set it)"
    elif native is None or abs(mpp - native) > 1e-12:
        mpp_s = (
            f"{mpp:.6g} µm/px (override; file says {native if native is not None else 'nothing'})"
        )
    else:
        mpp_s = f"{mpp:.6g} µm/px"
    lines = [
        f"path:     {info['path']}",
        f"backend:  {info['backend']}" + (f" ({info['vendor']})" if info.get("vendor") else ""),
        f"size:     {info['level_dimensions'][0][0]} x {info['level_dimensions'][0][1]} px (level 0)",
        f"mpp:      {mpp_s}",
        f"levels:   {info['level_count']}",
        "  level      width     height  downsample   mpp        tile",
    ]
    for i, ((w, h), ds, tg) in enumerate(
        zip(info["level_dimensions"], info["level_downsamples"], info["tile_grid"], strict=True)
    ):
        lmpp = f"{mpp * ds:.4g}" if mpp is not None else "-"
        tile = f"{tg[0]}x{tg[1]}" if tg else "untiled"
        lines.append(f"  {i:>5} {w:>10} {h:>10} {ds:>11.4f}   {lmpp:<10} {tile}")
    return "\n".join(lines)
