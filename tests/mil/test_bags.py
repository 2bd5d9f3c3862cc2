"""Loading bags from real HDF5 feature stores, and the checks on what is loaded."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
import torch
from bag_factory import make_bags, write_bags

from wsi_mil.errors import ConfigError, DataError
from wsi_mil.mil.bags import load_bags, resolve_features_dir
from wsi_mil.slides.table import SlideEntry


def _entries(bags, labels=None):
    return [
        SlideEntry(b.slide_id, None, b.label if labels is None else labels[i], None)
        for i, b in enumerate(bags)
    ]


def test_load_bags_keeps_order_values_and_coords(tmp_path):
    bags = make_bags(6, dim=8, n_min=5, n_max=9)
    write_bags(bags, tmp_path)
    loaded = load_bags(_entries(bags), tmp_path, progress=False)
    assert [b.slide_id for b in loaded] == [b.slide_id for b in bags]
    for syn, b in zip(bags, loaded, strict=True):
        assert torch.equal(b.features, torch.from_numpy(syn.features))
        assert b.label == syn.label and b.has_coords and b.dim == 8
        assert float(b.norm_coords.max()) < 1.0 and float(b.norm_coords.min()) >= 0.0
        assert np.array_equal(b.coords, syn.coords)


def test_missing_stores_are_skipped_with_one_warning(tmp_path, caplog):
    bags = make_bags(4, dim=8, n_min=5, n_max=9)
    write_bags(bags[:2], tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = load_bags(_entries(bags), tmp_path, progress=False)
    assert [b.slide_id for b in loaded] == ["bag000", "bag001"]
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "bag002" in warn[0] and "bag003" in warn[0]


def test_no_store_at_all_is_an_error(tmp_path):
    bags = make_bags(2, dim=8, n_min=5, n_max=9)
    with pytest.raises(DataError, match="none of the 2 slides"):
        load_bags(_entries(bags), tmp_path, progress=False)


def test_mixed_dims_is_an_error(tmp_path):
    write_bags(make_bags(2, dim=8, n_min=5, n_max=9), tmp_path)
    other = make_bags(3, dim=16, n_min=5, n_max=9)[2:]
    write_bags(other, tmp_path)
    with pytest.raises(DataError, match="different widths.*D=8.*D=16"):
        load_bags(_entries(make_bags(3, dim=8, n_min=5, n_max=9)), tmp_path, progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_features_name_the_slide(tmp_path, bad):
    bags = make_bags(3, dim=8, n_min=5, n_max=9)
    bags[1].features[2, 3] = bad
    write_bags(bags, tmp_path)
    with pytest.raises(DataError, match="bag001.*NaN/inf in 1 of"):
        load_bags(_entries(bags), tmp_path, progress=False)


def test_bad_or_missing_labels(tmp_path):
    bags = make_bags(2, dim=8, n_min=5, n_max=9)
    write_bags(bags, tmp_path)
    with pytest.raises(DataError, match="bag001 has label 2"):
        load_bags(_entries(bags, [0, 2]), tmp_path, progress=False)
    with pytest.raises(DataError, match="bag000 has no label"):
        load_bags(_entries(bags, [None, 1]), tmp_path, progress=False)
    assert (
        len(load_bags(_entries(bags, [None, 1]), tmp_path, require_labels=False, progress=False))
        == 2
    )


def test_store_without_coords(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["features"] = np.ones((4, 8), np.float32)
    (b,) = load_bags([SlideEntry("a", None, 1)], tmp_path, progress=False)
    assert not b.has_coords and b.coords is None


def test_features_dir_resolution(tmp_path):
    assert resolve_features_dir(tmp_path, tmp_path, None) == tmp_path
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_features_dir(tmp_path, tmp_path / "nope", None)
