"""Reading ``R/attention/<slide_id>.h5`` (written by ``wsi-mil predict``) and finding slides.

Layout (contract): datasets ``coords`` int64 (N, 2) level-0 xy of each patch's top-left
corner and ``attention`` float32 (N,); attrs ``slide_id``, ``slide_path`` ("" if unknown),
``patch_size_level0``, ``level0_width``, ``level0_height``, ``prob``, ``label`` (-1 if
unknown), ``split``; optional ``significant_bits``: the bit depth tiling read the slide's
>8-bit samples with (``tile --significant-bits``), which heatmap reads the slide with too
(absent: the file's own bit depth, as in files of earlier versions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_mil.errors import ConfigError, StoreError


@dataclass
class AttentionMap:
    """One slide's attention. ``coords`` (N, 2) int64 level-0 xy; ``attention`` (N,) float64."""

    slide_id: str
    path: Path
    coords: np.ndarray
    attention: np.ndarray
    patch_size_level0: int
    level0_size: tuple[int, int]  # (width, height) level-0 px
    slide_path: str
    prob: float | None
    label: int
    split: str
    significant_bits: int | None = None

    @property
    def has_coords(self) -> bool:
        return len(self.coords) == 0 or bool((self.coords >= 0).all())

    def __len__(self) -> int:
        return len(self.attention)


def _attr(attrs: object, key: str, default: object) -> object:
    v = attrs.get(key, default)  # type: ignore[attr-defined]
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def infer_patch_size_level0(coords_level0: np.ndarray) -> int:
    """Grid step of a patch grid (smallest positive gap between distinct x or y); 0 if unknown."""
    steps = []
    for col in (0, 1):
        u = np.unique(np.asarray(coords_level0)[:, col])
        if len(u) > 1:
            steps.append(int(np.diff(u).min()))
    return min(steps) if steps else 0


def read_attention(path: str | os.PathLike) -> AttentionMap:
    """Read and check one attention file; :class:`StoreError` naming the file if it is unusable."""
    import h5py

    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            for name in ("coords", "attention"):
                if name not in f:
                    raise StoreError(
                        f"{p}: no '{name}' dataset (not an attention file)",
                        "re-run 'wsi-mil predict' for this run",
                    )
            coords = np.asarray(f["coords"][()], dtype=np.int64)
            att = np.asarray(f["attention"][()], dtype=np.float64).reshape(-1)
            a = f.attrs
            sid = str(_attr(a, "slide_id", "") or p.stem)
            ps0 = int(_attr(a, "patch_size_level0", 0) or 0)
            w0 = int(_attr(a, "level0_width", 0) or 0)
            h0 = int(_attr(a, "level0_height", 0) or 0)
            slide_path = str(_attr(a, "slide_path", "") or "")
            prob_v = _attr(a, "prob", None)
            label = int(_attr(a, "label", -1))
            split = str(_attr(a, "split", "") or "")
            bits = _bits(_attr(a, "significant_bits", None), p)
    except StoreError:
        raise
    except OSError as e:
        raise StoreError(
            f"{p}: cannot read attention file ({str(e).splitlines()[0][:120]})",
            "the file may be truncated; re-run 'wsi-mil predict'",
        ) from None
    if coords.ndim != 2 or coords.shape[1:] != (2,) or len(coords) != len(att):
        raise StoreError(
            f"{p}: coords {coords.shape} do not match attention ({len(att)},)",
            "re-run 'wsi-mil predict' for this run",
        )
    if len(att) == 0:
        raise StoreError(f"{p}: no patches in the attention file", "the slide had no patches")
    if not np.isfinite(att).all():
        raise StoreError(
            f"{p}: attention holds NaN/inf values", "check the features and the model of this run"
        )
    if ps0 <= 0 and (coords >= 0).all():
        ps0 = infer_patch_size_level0(coords)
    if (w0 <= 0 or h0 <= 0) and (coords >= 0).all():
        w0, h0 = (int(v) for v in coords.max(axis=0) + max(ps0, 1))
    return AttentionMap(
        slide_id=sid,
        path=p,
        coords=coords,
        attention=att,
        patch_size_level0=ps0,
        level0_size=(w0, h0),
        slide_path=slide_path,
        prob=None if prob_v is None else float(prob_v),  # type: ignore[arg-type]
        label=label,
        split=split,
        significant_bits=bits,
    )


def _bits(v: object, path: Path) -> int | None:
    """A ``significant_bits`` attr value as int (None when absent or 0)."""
    if v is None or v == "":
        return None
    try:
        bits = int(v)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise StoreError(
            f"{path}: significant_bits attr {v!r} is not a bit depth",
            "re-run 'wsi-mil predict' for this run",
        ) from None
    return bits or None


def read_significant_bits(path: str | os.PathLike) -> int | None:
    """The ``significant_bits`` attr of an attention file (None: absent or unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return _bits(_attr(f.attrs, "significant_bits", None), Path(path))
    except (OSError, StoreError):
        return None


def attention_content_digest(path: str | os.PathLike) -> str:
    """sha256 of an attention file's datasets and attrs (not its mtime).

    ``wsi-mil predict`` rewrites every attention file on each run; identical content keeps
    this digest, so current heatmaps are not redrawn. Unreadable files hash as their error.
    """
    import hashlib

    import h5py

    h = hashlib.sha256()
    try:
        with h5py.File(path, "r") as f:
            for k in sorted(f.attrs):
                h.update(f"{k}={f.attrs[k]!r};".encode())
            for name in sorted(f):
                obj = f[name]
                if isinstance(obj, h5py.Dataset):
                    a = np.ascontiguousarray(obj[()])
                    h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
                    h.update(a.tobytes())
    except OSError as e:
        h.update(f"unreadable:{e}".encode())
    return h.hexdigest()


def attention_files(run_dir: str | os.PathLike) -> dict[str, Path]:
    """{slide_id: R/attention/<slide_id>.h5}, sorted; clear errors when there are none."""
    run = Path(run_dir)
    if not run.is_dir():
        raise StoreError(f"run folder {run} does not exist", "check --run")
    adir = run / "attention"
    files = sorted(adir.glob("*.h5")) if adir.is_dir() else []
    files = [f for f in files if not f.name.startswith(".")]  # temp files of a running predict
    if not files:
        raise StoreError(
            f"{run} has no attention files ({adir}/<slide_id>.h5)",
            f"run 'wsi-mil predict --run {run}' first",
        )
    return {f.stem: f for f in files}


def resolve_slide_paths(
    run_dir: str | os.PathLike,
    files: dict[str, Path],
    slides_csv: str | os.PathLike | None = None,
) -> dict[str, Path | None]:
    """{slide_id: slide file or None}: the slide table wins, else the attention file's
    ``slide_path`` (a relative one is tried against the current folder, then the run folder)."""
    import h5py

    table: dict[str, Path | None] = {}
    if slides_csv:
        from wsi_mil.slides import read_slide_table

        table = {e.slide_id: e.path for e in read_slide_table(slides_csv)}
    out: dict[str, Path | None] = {}
    for sid, f in files.items():
        if sid in table:
            out[sid] = table[sid]
            continue
        try:
            with h5py.File(f, "r") as h:
                sp = str(_attr(h.attrs, "slide_path", "") or "")
        except OSError:
            sp = ""
        if not sp:
            out[sid] = None
            continue
        p = Path(sp)
        if not p.is_absolute() and not p.exists() and (Path(run_dir) / p).exists():
            p = Path(run_dir) / p
        out[sid] = p
    return out


def check_slide_id(files: dict[str, Path], slide_id: str, run_dir: str | os.PathLike) -> None:
    """Clear error for an unknown ``--slide-id``."""
    if slide_id not in files:
        known = ", ".join(list(files)[:8]) + (" ..." if len(files) > 8 else "")
        raise ConfigError(
            f"unknown slide id {slide_id!r}: no {Path(run_dir) / 'attention' / (slide_id + '.h5')}",
            f"slides with attention in this run: {known}",
        )
