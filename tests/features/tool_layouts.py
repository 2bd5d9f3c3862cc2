"""Writers of other tools' feature-store layouts, as those tools write them (for tests)."""

from __future__ import annotations

from pathlib import Path

import h5py


def clam_save_hdf5(
    path: Path, assets: dict, attr_dict: dict | None = None, mode: str = "a"
) -> None:
    """CLAM's save_hdf5: chunks (1, ...), unlimited first axis, appended on later calls;
    ``attr_dict`` maps a dataset name to its attrs."""
    with h5py.File(path, mode) as f:
        for key, val in assets.items():
            if key not in f:
                d = f.create_dataset(
                    key,
                    shape=val.shape,
                    maxshape=(None,) + val.shape[1:],
                    chunks=(1,) + val.shape[1:],
                    dtype=val.dtype,
                )
                d[:] = val
                for k, v in ((attr_dict or {}).get(key) or {}).items():
                    d.attrs[k] = v
            else:
                d = f[key]
                d.resize(len(d) + val.shape[0], axis=0)
                d[-val.shape[0] :] = val
