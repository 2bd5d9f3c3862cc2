"""torchrun --nproc-per-node 2 (gloo, CPU) == one process with --bags-per-step 2 over the same bags.

Both runs start from the same seed; per epoch the same permutation is cut into groups of
G = 2 bags (2 ranks x 1 bag, or 1 process x 2 bags). Rank r backprops its bag / G, the
gradients are summed, every rank steps: the weights must match the single process's to
atol 1e-6 (float32; in practice they agree to rounding). An odd number of training bags
makes the last group partial (rank 1 has no bag there and contributes a zero gradient).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_mil.features.feature_store import write_features

ATOL = 1e-6
TORCHRUN_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HDF5_USE_FILE_LOCKING="FALSE")
    return env


def make_feature_stores(root: Path, n_train: int = 7, n_val: int = 4, dim: int = 16) -> Path:
    """Tiny labelled feature stores + slide table (label-1 bags carry a signal in dim 0)."""
    rng = np.random.default_rng(7)
    feats_dir = root / "features"
    rows = []
    for i in range(n_train + n_val):
        sid = f"s{i:02d}"
        label = i % 2
        n = int(rng.integers(12, 40))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        if label:
            x[: max(1, n // 5), 0] += 3.0
        xy = np.stack([rng.integers(0, 4000, n), rng.integers(0, 3000, n)], 1)
        attrs = {"level0_width": 4096, "level0_height": 3072, "patch_size_level0": 224}
        write_features(feats_dir / f"{sid}.h5", x, xy, attrs, patch_size=224, patch_level=0)
        rows.append((sid, "", label, "train" if i < n_train else "val"))
    table = root / "slides.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label", "split"])
        w.writerows(rows)
    return table


def _train_args(table: Path, root: Path, run: Path, bags_per_step: int, epochs: int) -> list[str]:
    return [
        "-q",
        "train",
        "--slides",
        str(table),
        "--features",
        str(root / "features"),
        "--work",
        str(root / "work"),
        "--run",
        str(run),
        "--epochs",
        str(epochs),
        "--bags-per-step",
        str(bags_per_step),
        "--device",
        "cpu",
        "--seed",
        "3",
        "--lr",
        "0.01",
        "--early-stop",
        "none",
    ]


def _weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    ck = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
    return ck["model"]


def _metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "metrics.csv")))


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_process_accumulation(tmp_path):
    table = make_feature_stores(tmp_path)
    epochs = 3
    single, multi = tmp_path / "run_single", tmp_path / "run_ddp"
    one = subprocess.run(
        [sys.executable, "-m", "wsi_mil", *_train_args(table, tmp_path, single, 2, epochs)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "--",  # torchrun's parser would take wsi-mil's --run for its own --run-path
            "wsi_mil",
            *_train_args(table, tmp_path, multi, 1, epochs),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = _weights(single), _weights(multi)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=ATOL, rtol=0), (k, (a[k] - b[k]).abs().max())

    # validation gathered across ranks: same per-epoch val metrics; train loss too
    ma, mb = _metrics(single), _metrics(multi)
    assert len(ma) == len(mb) == epochs
    for ra, rb in zip(ma, mb, strict=True):
        for col in ("train_loss", "val_loss", "val_auc"):
            assert float(ra[col]) == pytest.approx(float(rb[col]), abs=1e-5), col

    # rank 0 alone wrote the run folder: one set of files, no temp files left by rank 1
    names = sorted(p.relative_to(multi).as_posix() for p in multi.rglob("*") if p.is_file())
    assert not [n for n in names if ".tmp-" in n], names
    assert sorted(n for n in names if n.startswith("checkpoints/")) == [
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ]
    assert names == sorted(
        p.relative_to(single).as_posix() for p in single.rglob("*") if p.is_file()
    )


@pytest.mark.slow
def test_torchrun_differs_from_wrong_accumulation(tmp_path):
    """Guard that the comparison above can fail: 2 ranks x 1 bag != 1 process x 1 bag/step."""
    table = make_feature_stores(tmp_path)
    single = tmp_path / "run_b1"
    res = subprocess.run(
        [sys.executable, "-m", "wsi_mil", *_train_args(table, tmp_path, single, 1, 2)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    multi = tmp_path / "run_ddp"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "--",  # torchrun's parser would take wsi-mil's --run for its own --run-path
            "wsi_mil",
            *_train_args(table, tmp_path, multi, 1, 2),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(single), _weights(multi)
    assert any(not torch.allclose(a[k], b[k], atol=ATOL, rtol=0) for k in a)


# ---------------------------------------------------------------- end to end
P, GRID = 32, 4  # 16 patches of 32 px per slide


def make_patch_stores(root: Path, n_train: int = 5, n_val: int = 2) -> Path:
    """Tiny real zarr patch stores (noise; positives carry a red square) + slide table."""
    from wsi_mil.tiling.patch_store import PatchStoreWriter

    rng = np.random.default_rng(1)
    coords = np.array([(x * P, y * P) for y in range(GRID) for x in range(GRID)], np.int64)
    attrs = {"level": 0, "downsample": 1.0, "patch_size": P, "slide_path": ""}
    attrs |= {"level0_width": GRID * P, "level0_height": GRID * P}
    rows = []
    for i in range(n_train + n_val):
        label = i % 2
        px = rng.integers(150, 230, size=(len(coords), P, P, 3), dtype=np.uint8)
        if label:
            px[int(rng.integers(len(coords))), 8:24, 8:24] = (220, 20, 20)
        with PatchStoreWriter(root / "work" / "patches" / f"e{i}.zarr", coords, attrs) as w:
            w.write_pixels(0, px)
            w.commit()
        rows.append((f"e{i}", "", label, "train" if i < n_train else "val"))
    table = root / "e2e_slides.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "path", "label", "split"), *rows])
    return table


def _e2e_args(table: Path, root: Path, run: Path, bags_per_step: int) -> list[str]:
    small = ["--feature-dim", "16", "--encoder-width", "8", "--pos-dim", "8", "--attn-dim", "8"]
    return [
        "-q", "train", "--mode", "e2e", "--slides", str(table), "--work", str(root / "work"),
        "--run", str(run), "--epochs", "2", "--bags-per-step", str(bags_per_step),
        "--device", "cpu", "--seed", "5", "--lr", "0.003", "--early-stop", "none",
        # one chunk per bag, so each bag's gradient is summed in the same order in both runs
        "--chunk-size", str(GRID * GRID), "--hidden-dim", "8", *small,
    ]  # fmt: skip


@pytest.mark.slow
def test_torchrun_e2e_equals_single_process_accumulation(tmp_path):
    table = make_patch_stores(tmp_path)
    single, multi = tmp_path / "e2e_single", tmp_path / "e2e_ddp"
    one = subprocess.run(
        [sys.executable, "-m", "wsi_mil", *_e2e_args(table, tmp_path, single, 2)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + ["-m", "--", "wsi_mil", *_e2e_args(table, tmp_path, multi, 1)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ca = torch.load(single / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    cb = torch.load(multi / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    for part in ("model",):
        for k, v in ca[part].items():
            assert torch.allclose(v, cb[part][k], atol=ATOL, rtol=0), (
                k,
                (v - cb[part][k]).abs().max(),
            )
    ea, eb = ca["extra"]["encoder"], cb["extra"]["encoder"]
    assert ea.keys() == eb.keys()
    for k, v in ea.items():
        if v.is_floating_point():
            assert torch.allclose(v, eb[k], atol=ATOL, rtol=0), (k, (v - eb[k]).abs().max())
        else:
            assert torch.equal(v, eb[k]), k
    ma, mb = _metrics(single), _metrics(multi)
    for ra, rb in zip(ma, mb, strict=True):
        assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), abs=1e-5)
    assert (multi / "encoder.pt").is_file()
    assert not [p for p in multi.rglob("*") if ".tmp-" in p.name]
