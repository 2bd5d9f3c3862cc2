"""Feature store: ``W/features/<encoder-tag>/<slide_id>.h5`` — *contract* format.

Root datasets ``features`` float32 (N, D) and ``coords`` int64 (N, 2) (the
CLAM/TRIDENT layout); ``coords`` attrs ``patch_size`` (px at ``patch_level``),
``patch_level``, ``patch_size_level0``; root attrs ``encoder``, ``encoder_tag``,
``encoder_weights_sha256``, ``level0_width``, ``level0_height``, ``mpp``, ``downsample``,
``patch_size_level0``, ``slide_path``, ``source_store``, ``source_digest``,
``wsi_mil_version``. Files are written under a temporary name and renamed into place.

Readers (:func:`open_features`) also accept other tools' layouts:

- CLAM ``h5_files/<id>.h5``: root ``features`` (N, D) float32 + ``coords`` (N, 2) int32,
  appended batch by batch: one without its ``pt_files/<id>.pt`` (written when the slide is
  done) is refused as unfinished;
- CLAM ``pt_files/<id>.pt``: a (N, D) tensor, coords from the matching ``h5_files/<id>.h5``
  or CLAM's ``patches/<id>.h5``;
- TRIDENT ``features_<encoder>/<id>.h5``: ``features`` (float16 or float32) + ``coords`` with
  ``coords`` attrs ``patch_size``, ``patch_size_level0``, ``level0_magnification`` ...;
  ``features_<encoder>/<id>.pt``: the numpy array (numpy 1.x or 2 pickle), coords from
  ``../patches/<id>_patches.h5``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_mil import __version__
from wsi_mil.batch import atomic_path
from wsi_mil.errors import StoreError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # ~1 MiB feature chunks: cheap partial writes, quick whole reads


@dataclass
class FeatureBag:
    """One slide's cached features. ``coords`` is None for stores without coordinates."""

    features: np.ndarray  # (N, D) float32
    coords: np.ndarray | None  # (N, 2) int64 level-0 (x, y)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    level0_size: tuple[int, int] | None = None  # (width, height) px

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def norm_coords(self) -> np.ndarray | None:
        """(N, 2) float32 in [0, 1]: coords / level-0 (width, height); None without coords."""
        if self.coords is None:
            return None
        if self.level0_size is not None:
            wh = np.array(self.level0_size, np.float64)
        else:  # other tools' stores may lack slide size: use the extent of the patch grid
            ps = float(self.attrs.get("patch_size_level0", 0) or 0)
            wh = (
                self.coords.max(axis=0).astype(np.float64) + max(ps, 1.0)
                if len(self.coords)
                else np.ones(2)
            )
        return (self.coords / np.maximum(wh, 1.0)).astype(np.float32)


# ---------------------------------------------------------------- writing
class FeatureStoreWriter:
    """Stream features of one slide into a store; atomic: nothing appears until :meth:`commit`.

    ``with FeatureStoreWriter(path, n, dim, coords, attrs, patch_size, patch_level) as w:``
    ``    w.write(start, feats)`` ... ; ``w.commit()``. Leaving without commit removes the temp file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n: int,
        dim: int,
        coords: np.ndarray,
        attrs: dict[str, Any],
        patch_size: int,
        patch_level: int,
        dtype: str = "float32",
        coords_attrs: dict[str, Any] | None = None,
    ) -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        self.path = Path(path)
        self.n, self.dim, self.dtype = int(n), int(dim), dtype
        self.coords = np.asarray(coords, np.int64).reshape(-1, 2)
        if len(self.coords) != self.n:
            raise ValueError(f"{len(self.coords)} coords for {n} features")
        self.attrs = attrs
        self.coords_attrs = {
            "patch_size": int(patch_size),
            "patch_level": int(patch_level),
            **(coords_attrs or {}),
        }
        self._ctx = atomic_path(self.path)
        self._committed = False
        self._written = 0

    def __enter__(self) -> FeatureStoreWriter:
        self.tmp = self._ctx.__enter__()
        try:
            self.f = h5py.File(self.tmp, "w", rdcc_nbytes=4 * CHUNK_BYTES)
            itemsize = np.dtype(self.dtype).itemsize
            rows = max(1, min(self.n, CHUNK_BYTES // max(1, self.dim * itemsize)))
            self.dset = self.f.create_dataset(
                "features",
                shape=(self.n, self.dim),
                dtype=self.dtype,
                chunks=(rows, self.dim) if self.n else None,
            )
            c = self.f.create_dataset("coords", data=self.coords)
            for k, v in self.coords_attrs.items():
                c.attrs[k] = _h5_value(v)
        except BaseException:
            self._ctx.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, start: int, feats: np.ndarray) -> None:
        """Write (n, D) features at rows [start, start + n)."""
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features of shape {feats.shape}, store expects (n, {self.dim})")
        self.dset[start : start + len(feats)] = feats.astype(self.dtype, copy=False)
        self._written += len(feats)

    def commit(self) -> None:
        """Write the root attrs (last) and mark the store for renaming into place."""
        for k, v in {**self.attrs, "n_patches": self.n, "wsi_mil_version": __version__}.items():
            self.f.attrs[k] = _h5_value(v)
        self._committed = True

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        self.f.close()
        if et is None and not self._committed:
            et, ev = StoreError, StoreError(f"{self.path}: writer closed without commit()")
            self._ctx.__exit__(et, ev, None)
            raise ev
        return bool(self._ctx.__exit__(et, ev, tb))


def _h5_value(v: Any) -> Any:
    """HDF5 attrs cannot hold None or Paths: None -> "" (read back as None), Path -> str."""
    if v is None:
        return ""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def write_features(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
    patch_size: int,
    patch_level: int,
    dtype: str = "float32",
) -> None:
    """Write a feature store atomically. ``features`` (N, D), ``coords`` (N, 2) level-0 px."""
    features = np.asarray(features)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"features {features.shape} and coords {coords.shape} disagree")
    with FeatureStoreWriter(
        path, len(features), features.shape[1], coords, attrs, patch_size, patch_level, dtype
    ) as w:
        if len(features):
            w.write(0, features)
        w.commit()


# ---------------------------------------------------------------- reading
def open_features(
    path: str | os.PathLike, coords_path: str | os.PathLike | None = None
) -> FeatureBag:
    """Read one feature store: ours, CLAM ``h5_files``/``pt_files`` or TRIDENT ``features_*``.

    ``coords_path``: an HDF5 file with a ``coords`` dataset, for ``.pt`` features (default:
    looked up next to them, CLAM-style). Without coords the bag's ``coords`` is None.
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(
            f"{p}: feature store not found", "run 'wsi-mil extract' or pass --features DIR"
        )
    if p.suffix.lower() == ".pt":
        return _open_pt(p, Path(coords_path) if coords_path else None)
    try:
        with h5py.File(p, "r") as f:
            if "features" not in f:
                raise _no_features_error(p, list(f))
            feats = _as_array(p, f["features"], "features", np.float32)
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
            attrs.update({f"features_{k}": plain_attr(v) for k, v in f["features"].attrs.items()})
            coords = None
            if "coords" in f:
                coords = _as_array(p, f["coords"], "coords", np.int64)
                attrs.update({f"coords_{k}": plain_attr(v) for k, v in f["coords"].attrs.items()})
    except StoreError:
        raise
    except OSError as e:
        raise StoreError(
            f"{p}: unreadable HDF5 file ({e})", "delete it and re-run 'wsi-mil extract'"
        ) from None
    if "wsi_mil_version" not in attrs:  # ours are written whole; CLAM's batch by batch
        _check_clam_h5_complete(p)
    if coords is None and coords_path is not None:
        coords, extra = _read_coords_h5(Path(coords_path))
        attrs.update({f"coords_{k}": v for k, v in extra.items()})
    return _make_bag(p, feats, coords, attrs)


def _no_features_error(p: Path, names: list[str]) -> StoreError:
    """No root ``features``: say what the file holds; a coords-only file is a patching output."""
    held = f" (it holds {', '.join(repr(n) for n in names[:8])})" if names else " (it is empty)"
    if names == ["coords"]:
        return StoreError(
            f"{p}: no 'features' dataset, a patch coordinates file{held}",
            "pass the folder of feature files (CLAM h5_files/ or pt_files/, TRIDENT "
            "features_<encoder>/, ours W/features/<tag>/), not the patches/ folder",
        )
    return StoreError(
        f"{p}: no 'features' dataset{held}",
        "expected CLAM/TRIDENT layout: root 'features' (N, D) and 'coords' (N, 2)",
    )


def _as_array(p: Path, obj: Any, name: str, dtype: type) -> np.ndarray:
    """HDF5 dataset (or loaded array) ``obj`` as a numeric ``dtype`` array; :class:`StoreError`
    for a group, a scalar or non-numeric values (strings, objects, complex)."""
    layout = "root 'features' (N, D) float and 'coords' (N, 2) int: the CLAM/TRIDENT layout"
    if isinstance(obj, h5py.Group):
        raise StoreError(f"{p}: '{name}' is an HDF5 group, not a dataset", f"expected {layout}")
    kind = np.dtype(obj.dtype).kind
    if kind not in "fiub" or not np.ndim(obj):
        what = f"dtype {obj.dtype}" if kind not in "fiub" else "a single value"
        raise StoreError(f"{p}: '{name}' holds {what}, not numbers per patch", f"expected {layout}")
    return np.asarray(obj[()] if isinstance(obj, h5py.Dataset) else obj, dtype)


def _check_clam_h5_complete(p: Path) -> None:
    """CLAM's ``extract_features_fp.py`` appends ``h5_files/<id>.h5`` batch by batch and writes
    ``pt_files/<id>.pt`` only when the slide is done: an h5 without its ``.pt`` twin, next to a
    ``pt_files/`` folder in use, is a slide still being extracted (or a killed job's part)."""
    p = p.absolute()  # a bare file name given from inside h5_files/ too
    if p.parent.name != "h5_files":
        return
    pt_dir = p.parent.parent / "pt_files"
    if not pt_dir.is_dir() or (pt_dir / f"{p.stem}.pt").exists():
        return
    if next(pt_dir.glob("*.pt"), None) is not None:
        raise StoreError(
            f"{p}: CLAM feature file without its {pt_dir.name}/{p.stem}.pt: CLAM writes the .pt "
            "when a slide is done, so this one is still being extracted or its job was killed",
            f"re-run CLAM's extract_features_fp.py for {p.stem}, or delete {p} to skip the slide",
        )


def _open_pt(p: Path, coords_path: Path | None) -> FeatureBag:
    import torch

    try:
        obj = _torch_load_arrays(p)
    except Exception as e:  # noqa: BLE001
        lines = str(e).splitlines() or [type(e).__name__]
        why = next((ln.strip() for ln in lines if "Unsupported" in ln), lines[0])
        raise StoreError(
            f"{p}: cannot load with torch.load(weights_only=True): {why[:200]}",
            "expected a (N, D) tensor as CLAM's pt_files hold",
        ) from None
    if isinstance(obj, dict):
        obj = obj.get("features", obj.get("feats"))
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().float().cpu().numpy()
    if not isinstance(obj, np.ndarray):
        raise StoreError(
            f"{p}: holds {type(obj).__name__}, not a features tensor",
            "expected a (N, D) tensor as CLAM's pt_files hold",
        )
    feats = _as_array(p, obj, "features", np.float32)
    coords, attrs = None, {}
    cpath = coords_path or _find_coords_for_pt(p)
    if cpath is not None:
        coords, extra = _read_coords_h5(cpath)
        attrs = {f"coords_{k}": v for k, v in extra.items()}
        attrs["coords_file"] = str(cpath)
    else:
        log.info(
            "%s: no coords h5 found (h5_files/ or patches/); positional encoding will be off", p
        )
    return _make_bag(p, feats, coords, attrs)


def _torch_load_arrays(p: Path) -> Any:
    """``torch.load(weights_only=True)``, also allowing plain numpy arrays (TRIDENT's
    ``--save_features_as pt``: ``torch.save`` of the (N, D) array), pickled by numpy 2
    (``numpy._core.multiarray._reconstruct``) or numpy 1.x (``numpy.core.multiarray``)."""
    import torch

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: tensors (CLAM's pt_files) only
        return torch.load(p, map_location="cpu", weights_only=True)
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64)]
    allowed: list[Any] = [_reconstruct, np.ndarray, np.dtype, *dtypes]
    if _torch_version() >= (2, 6):  # (object, name) pairs: the other numpy's module name
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if module != _reconstruct.__module__:
                allowed.append((_reconstruct, f"{module}._reconstruct"))
    with safe_globals(allowed):
        return torch.load(p, map_location="cpu", weights_only=True)


def _torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch; (0, 0) if it does not parse."""
    import torch

    try:
        major, minor = torch.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def _find_coords_for_pt(p: Path) -> Path | None:
    """CLAM: ``<feat_dir>/pt_files/<id>.pt`` -> ``<feat_dir>/h5_files/<id>.h5`` or ``patches/<id>.h5``."""
    stem, d = p.stem, p.parent
    for cand in (
        d.parent / "h5_files" / f"{stem}.h5",
        d / f"{stem}.h5",
        d.parent / "patches" / f"{stem}.h5",
        d.parent.parent / "patches" / f"{stem}.h5",
        d.parent / "patches" / f"{stem}_patches.h5",
    ):
        if cand.is_file():
            try:
                with h5py.File(cand, "r") as f:
                    if "coords" in f:
                        return cand
            except OSError:
                continue
    return None


def _read_coords_h5(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise StoreError(
                    f"{path}: no 'coords' dataset",
                    "pass the CLAM/TRIDENT patches or h5_files file of this slide",
                )
            return _as_array(path, f["coords"], "coords", np.int64), {
                k: plain_attr(v) for k, v in f["coords"].attrs.items()
            }
    except OSError as e:
        raise StoreError(f"{path}: unreadable HDF5 coords file ({e})") from None


def _make_bag(
    p: Path, feats: np.ndarray, coords: np.ndarray | None, attrs: dict[str, Any]
) -> FeatureBag:
    if feats.ndim == 3 and feats.shape[0] == 1:  # some tools store (1, N, D)
        feats = feats[0]
    if coords is not None and coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim == 1 and not feats.size:  # no patches, written without a width
        feats = feats.reshape(0, 0)
    if feats.ndim == 1:
        raise StoreError(
            f"{p}: features have shape {feats.shape}, expected (N, D): one vector per slide",
            "that is a slide embedding (e.g. TRIDENT slide_features_*); pass the folder of "
            "patch features (CLAM h5_files/pt_files, TRIDENT features_<encoder>)",
        )
    if feats.ndim != 2:
        raise StoreError(f"{p}: features have shape {feats.shape}, expected (N, D)")
    if coords is not None:
        if not coords.size:
            coords = np.zeros((0, 2), np.int64)
        elif coords.ndim != 2 or coords.shape[1] != 2:
            transposed = coords.ndim == 2 and coords.shape[0] == 2
            raise StoreError(
                f"{p}: coords have shape {coords.shape}, expected (N, 2) level-0 (x, y)",
                "transpose them when writing the store"
                if transposed
                else "write one (x, y) row per patch, in the order of the features",
            )
        elif coords.min() < 0:
            raise StoreError(
                f"{p}: coords hold negative values (min {coords.min()}); expected level-0 px "
                "of each patch's top-left corner",
                "rewrite the store with the patch corners in level-0 pixels",
            )
        if len(coords) != len(feats):
            transposed = feats.shape[1] == len(coords)
            raise StoreError(
                f"{p}: {len(feats)} features but {len(coords)} coords",
                f"the features look transposed, {feats.shape} = (D, N): write them as (N, D)"
                if transposed
                else "the coords file belongs to another slide or tiling",
            )
    for k in ("mpp", "downsample", "encoder_weights_sha256", "slide_path"):
        if attrs.get(k) == "":  # HDF5 attrs cannot hold None; we write "" for "unknown"
            attrs[k] = None
    if not attrs.get("patch_size_level0"):
        ps0 = _patch_size_level0_from_coords_attrs(attrs)
        if ps0 is None and coords is not None:
            ps0 = _infer_patch_spacing(coords)
            attrs["patch_size_level0_inferred"] = ps0 is not None
        if ps0 is not None:
            attrs["patch_size_level0"] = ps0
    return FeatureBag(feats, coords, attrs, p, _level0_size(attrs))


def _level0_size(attrs: dict[str, Any]) -> tuple[int, int] | None:
    """Level-0 (width, height): ours (root attrs), TRIDENT (``coords`` attrs ``level0_width``/
    ``level0_height``) or CLAM's patches h5 (``coords`` attrs ``level_dim`` of ``patch_level``
    times ``downsample``); None when the store does not say (CLAM ``h5_files``)."""
    for prefix in ("", "coords_"):
        w, h = attrs.get(f"{prefix}level0_width"), attrs.get(f"{prefix}level0_height")
        try:
            if w and h and int(w) > 0 and int(h) > 0:
                return int(w), int(h)
        except (TypeError, ValueError):  # e.g. TRIDENT's "None" strings
            continue
    dims = attrs.get("coords_level_dim")
    try:
        dims = [float(v) for v in np.ravel(dims)] if dims is not None else []
        ds = attrs.get("coords_downsample", 1.0)
        ds = [float(v) for v in np.ravel(ds)] if ds is not None else [1.0]
        if len(dims) == 2 and all(d > 0 for d in dims):
            dx, dy = (ds[0], ds[-1]) if ds else (1.0, 1.0)
            return int(round(dims[0] * dx)), int(round(dims[1] * dy))
    except (TypeError, ValueError):
        pass
    return None


def _patch_size_level0_from_coords_attrs(attrs: dict[str, Any]) -> int | None:
    """Level-0 px of a patch side from the ``coords`` attrs: TRIDENT's ``patch_size_level0``,
    else TRIDENT's own formula ``round(patch_size * level0_magnification / target_magnification)``,
    else CLAM's patches h5 ``patch_size * downsample`` (or ``patch_size`` at ``patch_level`` 0);
    None when none of them is there (each is tried alone: TRIDENT writes None as "None")."""
    ps = attrs.get("coords_patch_size")
    candidates = (
        lambda: int(attrs["coords_patch_size_level0"]),
        lambda: int(  # as TRIDENT's coords_to_h5 computes it
            round(
                float(ps)
                * float(attrs["coords_level0_magnification"])
                / float(attrs["coords_target_magnification"])
            )
        ),
        lambda: int(round(float(ps) * float(np.ravel(attrs["coords_downsample"])[0]))),
        lambda: int(ps) if attrs.get("coords_patch_level") == 0 else None,
    )
    for candidate in candidates:
        try:
            v = candidate()
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
            continue
        if v is not None and v > 0:
            return v
    return None


def _infer_patch_spacing(coords: np.ndarray) -> int | None:
    """Smallest positive gap between distinct x (or y) coords: the grid step, ~ patch size."""
    gaps = []
    for axis in (0, 1):
        u = np.unique(coords[:, axis])
        if len(u) > 1:
            gaps.append(int(np.diff(u).min()))
    return min(gaps) if gaps else None


def find_feature_file(features_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """The feature file of ``slide_id`` under ``features_dir``, in any supported layout, or None.

    Looks for ``<id>.h5`` (ours), CLAM ``h5_files/<id>.h5`` then ``pt_files/<id>.pt``,
    ``<id>.pt``, and TRIDENT ``features_*/<id>.h5`` or ``.pt`` (``features_dir`` may be the
    ``features_<enc>`` folder, its parent, or the TRIDENT job folder). Several TRIDENT
    encoders holding the slide is ambiguous: :class:`StoreError` asks for the exact folder.
    """
    d = Path(features_dir)
    for cand in (
        d / f"{slide_id}.h5",
        d / "h5_files" / f"{slide_id}.h5",
        d / "pt_files" / f"{slide_id}.pt",
        d / f"{slide_id}.pt",
    ):
        if cand.is_file():
            return cand
    for pattern in (
        f"features_*/{slide_id}.h5",
        f"*/features_*/{slide_id}.h5",
        f"features_*/{slide_id}.pt",  # TRIDENT --save_features_as pt (coords: ../patches/)
        f"*/features_*/{slide_id}.pt",
    ):
        hits = sorted(p for p in d.glob(pattern) if p.is_file())
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise StoreError(
                f"{d}: several feature files for {slide_id}: {', '.join(str(h.parent.relative_to(d)) for h in hits)}",
                "pass the one features_<encoder> folder to use",
            )
    return None


def plain_attr(v: Any) -> Any:
    """An HDF5 attr value as plain Python: bytes -> str, numpy scalar -> Python scalar,
    array -> list."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
