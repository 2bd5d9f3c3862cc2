"""End-to-end training on real zarr patch stores: outputs, encoder export, options, predict bags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from wsi_mil.config import ModelConfig, TrainConfig
from wsi_mil.errors import ConfigError, StoreError
from wsi_mil.features.encoders import create_encoder, preprocess
from wsi_mil.slides.table import SlideEntry
from wsi_mil.tiling.patch_store import PatchStore, PatchStoreWriter
from wsi_mil.train.e2e import (
    BagReader,
    E2EEncoder,
    augment_patches,
    encode_bags,
    sample_indices,
    standardise_output_layer,
    train_e2e,
)

P = 32  # patch px
GRID = 4  # patches per side -> 16 patches per slide


pytestmark = pytest.mark.usefixtures("one_thread")


def write_store(
    path: Path, label: int, rng: np.random.Generator, chunk_patches: int = 5, **extra_attrs
) -> None:
    """A GRID x GRID patch store of noise; positive slides get a solid red square in one patch."""
    coords = np.array([(x * P, y * P) for y in range(GRID) for x in range(GRID)], np.int64)
    px = rng.integers(150, 230, size=(len(coords), P, P, 3), dtype=np.uint8)
    if label:
        k = int(rng.integers(len(coords)))
        px[k, 8:24, 8:24] = (220, 20, 20)
    attrs = {
        "level": 0,
        "downsample": 1.0,
        "patch_size": P,
        "level0_width": GRID * P,
        "level0_height": GRID * P,
        "slide_path": "",
        **extra_attrs,
    }
    with PatchStoreWriter(path, coords, attrs, chunk_patches=chunk_patches) as w:
        w.write_pixels(0, px)
        w.commit()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SlideEntry]]:
    w = tmp_path_factory.mktemp("e2e_work")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(8):
        label = i % 2
        write_store(w / "patches" / f"s{i}.zarr", label, rng)
        entries.append(SlideEntry(f"s{i}", None, label, "val" if i >= 6 else "train"))
    return w, entries


def make_cfg(work: Path, run: Path, **kw) -> TrainConfig:
    base = dict(
        work=work, run=run, mode="e2e", epochs=2, feature_dim=16, chunk_size=5, lr=1e-3,
        model=ModelConfig(pos_dim=8, attn_dim=8, hidden_dim=8), device="cpu", early_stop="none",
        encoder_width=8,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def encoder_params(enc: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in enc.named_parameters()}


def test_train_e2e_outputs_and_encoder_export(work, tmp_path: Path) -> None:
    w, entries = work
    run = train_e2e(make_cfg(w, tmp_path / "run", augment=True), entries, progress=False)
    for name in (
        "config.yaml",
        "metrics.csv",
        "splits.csv",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "encoder.pt",
    ):
        assert (run / name).is_file(), name
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 epochs
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["model_config"]["in_dim"] == 16 and "encoder" in ck["extra"]
    enc_pt = torch.load(run / "encoder.pt", weights_only=True)
    assert enc_pt["encoder"] == "resnet-patch-cnn" and enc_pt["kwargs"]["feature_dim"] == 16
    # the exported encoder changed (it was trained) and loads through create_encoder(weights=)
    init = create_encoder("resnet-patch-cnn", feature_dim=16, seed=0, widths=(8, 16, 32))
    trained = create_encoder(weights=run / "encoder.pt")
    assert trained.info.trained and trained.info.out_dim == 16
    diff = [
        k
        for k, v in encoder_params(init).items()
        if not torch.equal(v, dict(trained.named_parameters())[k])
    ]
    assert diff, "encoder weights did not change in end-to-end training"
    # encode_bags (predict's source of e2e bags) = the exported encoder on every patch
    pairs = list(encode_bags(run, entries[:2], w, device="cpu"))
    assert [e.slide_id for e, _ in pairs] == ["s0", "s1"]
    store = PatchStore.open(w / "patches" / "s1.zarr")
    with torch.no_grad():
        ref = trained(preprocess(store.pixels(0, len(store)), trained.info)).numpy()
    fb = pairs[1][1]
    assert fb.features.shape == (GRID * GRID, 16) and fb.coords.shape == (GRID * GRID, 2)
    np.testing.assert_allclose(fb.features, ref, rtol=1e-4, atol=1e-5)
    assert fb.attrs["patch_size_level0"] == P and fb.level0_size == (GRID * P, GRID * P)
    # `wsi-mil extract --weights R/encoder.pt` builds a cache with the same features
    from wsi_mil.config import ExtractConfig
    from wsi_mil.features.extract import extract_slides
    from wsi_mil.features.feature_store import open_features

    res = extract_slides(
        ExtractConfig(
            work=w, weights=run / "encoder.pt", features=tmp_path / "feats", device="cpu", workers=1
        ),
        entries[:2],
        progress=False,
    )
    torch.set_num_threads(1)
    assert res.exit_code == 0
    cached = open_features(tmp_path / "feats" / "s1.h5")
    np.testing.assert_allclose(cached.features, fb.features, rtol=1e-4, atol=1e-5)


def test_frozen_encoder_epochs_and_encoder_lr(work, tmp_path: Path) -> None:
    w, entries = work
    init = encoder_params(
        create_encoder("resnet-patch-cnn", feature_dim=16, seed=0, widths=(8, 16, 32))
    )

    def trained_params(**kw) -> dict[str, torch.Tensor]:
        run = train_e2e(
            make_cfg(w, tmp_path / str(len(list(tmp_path.iterdir()))), epochs=1, **kw),
            entries,
            progress=False,
        )
        return encoder_params(create_encoder(weights=run / "encoder.pt"))

    # the data-dependent init (BN calibration + standardised output layer) changes only fc
    frozen = trained_params(freeze_encoder_epochs=1)
    assert all(torch.equal(frozen[k], init[k]) for k in init if not k.startswith("fc."))
    assert not torch.equal(frozen["fc.weight"], init["fc.weight"])
    zero_lr = trained_params(encoder_lr=0.0)
    assert all(torch.equal(zero_lr[k], frozen[k]) for k in init)
    moved = trained_params(encoder_lr=1e-3)
    assert any(not torch.equal(moved[k], frozen[k]) for k in init if not k.startswith("fc."))


def test_standardise_output_layer_gives_unit_features() -> None:
    torch.manual_seed(0)
    enc = create_encoder("resnet-patch-cnn", feature_dim=16, seed=0, widths=(8, 16, 32)).eval()
    batches = [torch.randn(24, 3, 32, 32) * 0.5 + 0.3 for _ in range(3)]
    with torch.no_grad():
        before = torch.cat([enc(x) for x in batches])
    assert standardise_output_layer(enc, iter(batches))
    with torch.no_grad():
        after = torch.cat([enc(x) for x in batches])
    torch.testing.assert_close(after.mean(0), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(after.std(0), torch.ones(16), atol=1e-4, rtol=0)
    # a per-feature affine map of the old features: correlations are unchanged
    torch.testing.assert_close(torch.corrcoef(after.T), torch.corrcoef(before.T), atol=1e-4, rtol=0)


def test_groupnorm_and_patch_sampling(work, tmp_path: Path) -> None:
    w, entries = work
    run = train_e2e(
        make_cfg(w, tmp_path / "gn", epochs=1, norm="groupnorm", max_patches_per_bag=6),
        entries,
        progress=False,
    )
    enc = create_encoder(weights=run / "encoder.pt")
    assert enc.info.kwargs["norm"] == "groupnorm"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())


def test_sample_indices_and_subset_reader(work) -> None:
    w, _ = work
    assert sample_indices(10, None, 0, 0, 0) is None and sample_indices(10, 10, 0, 0, 0) is None
    idx = sample_indices(16, 7, seed=1, epoch=2, bag=3)
    assert len(idx) == 7 and np.all(np.diff(idx) > 0) and idx.max() < 16
    np.testing.assert_array_equal(idx, sample_indices(16, 7, seed=1, epoch=2, bag=3))
    assert not np.array_equal(idx, sample_indices(16, 7, seed=1, epoch=3, bag=3))
    store = PatchStore.open(w / "patches" / "s0.zarr")
    r = BagReader(store, idx, block=5)
    assert len(r) == 7
    np.testing.assert_array_equal(r(0, 7), store.pixels(0, 16)[idx])
    np.testing.assert_array_equal(r(2, 5), store.pixels(0, 16)[idx[2:5]])
    np.testing.assert_array_equal(r.norm_coords(), store.norm_coords[idx])


def test_augment_replays_under_seed() -> None:
    x = torch.randn(6, 3, 8, 8)
    torch.manual_seed(3)
    a = augment_patches(x)
    torch.manual_seed(3)
    b = augment_patches(x)
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_bad_options_and_missing_stores(work, tmp_path: Path) -> None:
    w, entries = work
    with pytest.raises(ConfigError, match="norm"):
        train_e2e(make_cfg(w, tmp_path / "a", norm="bn-train"), entries, progress=False)
    with pytest.raises(ConfigError, match="chunk-size"):
        train_e2e(make_cfg(w, tmp_path / "b", chunk_size=0), entries, progress=False)
    ghost = [*entries, SlideEntry("ghost", None, 1, "train")]
    with pytest.raises(StoreError, match="ghost.*wsi-mil tile"):
        train_e2e(make_cfg(w, tmp_path / "c"), ghost, progress=False)
    with pytest.raises(StoreError):
        E2EEncoder(tmp_path / "nowhere")


def test_resume_refuses_changed_patch_stores(work, tmp_path: Path) -> None:
    """An e2e run records its patch stores' digests; --resume after a slide was re-tiled
    (other tiling parameters) is refused, naming the slide, before the run folder changes."""
    import shutil

    w0, entries = work
    w = tmp_path / "w"
    shutil.copytree(w0 / "patches", w / "patches")
    run = train_e2e(make_cfg(w, tmp_path / "r", epochs=1), entries, progress=False)
    last = run / "checkpoints" / "last.pt"
    assert sorted(torch.load(last, weights_only=True)["inputs"]) == [e.slide_id for e in entries]
    train_e2e(make_cfg(w, run, epochs=2, resume=True), entries, progress=False)  # unchanged
    before = last.read_bytes(), (run / "config.yaml").read_bytes()
    shutil.rmtree(w / "patches" / "s2.zarr")
    write_store(w / "patches" / "s2.zarr", 0, np.random.default_rng(5), min_tissue=0.5)
    with pytest.raises(
        ConfigError, match=r"other patch stores: those of 1 of 8 slides changed since \(s2\)"
    ):
        train_e2e(make_cfg(w, run, epochs=3, resume=True), entries, progress=False)
    assert (last.read_bytes(), (run / "config.yaml").read_bytes()) == before


def test_default_encoder_lr_is_a_tenth_of_the_head_lr(work, tmp_path: Path) -> None:
    w, entries = work
    run = train_e2e(make_cfg(w, tmp_path / "r", epochs=1, lr=2e-3), entries, progress=False)
    groups = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["optimizer"]
    lrs = {
        g["name"]: g["initial_lr"] if "initial_lr" in g else g["lr"] for g in groups["param_groups"]
    }
    assert lrs == pytest.approx({"head": 2e-3, "encoder": 2e-4})
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["encoder_lr"] == pytest.approx(2e-4)


def test_config_dataclass_has_e2e_fields() -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {
        "chunk_size",
        "max_patches_per_bag",
        "freeze_encoder_epochs",
        "encoder_lr",
        "norm",
        "augment",
    } <= names


def _cli_args(w: Path, csv_path: Path, run: Path) -> list[str]:
    return [
        "-q", "train", "--mode", "e2e", "--slides", str(csv_path), "--work", str(w), "--run", str(run),
        "--epochs", "4", "--feature-dim", "16", "--encoder-width", "8", "--chunk-size", "5",
        "--pos-dim", "8", "--attn-dim", "8", "--hidden-dim", "8", "--early-stop", "none",
        "--augment", "--max-patches-per-bag", "12", "--device", "cpu",
    ]  # fmt: skip


@pytest.mark.slow
def test_killed_e2e_run_resumes_exactly(work, tmp_path: Path) -> None:
    """SIGKILL a real `wsi-mil train --mode e2e` mid-run; --resume ends where an uninterrupted run does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    w, entries = work
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text(
        "slide_id,path,label,split\n"
        + "".join(f"{e.slide_id},,{e.label},{e.split}\n" for e in entries)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "wsi_mil"]

    ref = tmp_path / "ref"
    done = subprocess.run(
        [*cmd, *_cli_args(w, csv_path, ref)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, *_cli_args(w, csv_path, run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = run / "metrics.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (
            metrics.is_file() and len(metrics.read_text().strip().splitlines()) >= 3
        ):  # 2 epochs done
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert 2 <= killed_at < 4

    again = subprocess.run(
        [*cmd, *_cli_args(w, csv_path, run)], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to overwrite silently
    resumed = subprocess.run(
        [*cmd, *_cli_args(w, csv_path, run), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr

    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for part in ("model", "optimizer"):
        assert part in b
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    for k, v in a["extra"]["encoder"].items():
        torch.testing.assert_close(b["extra"]["encoder"][k], v, rtol=0, atol=0, msg=k)
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    ea = torch.load(ref / "encoder.pt", weights_only=True)["state_dict"]
    eb = torch.load(run / "encoder.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)

    # predict on the e2e run: bags come from the run's encoder, attention files per slide
    pred = subprocess.run(
        [
            *cmd,
            "-q",
            "predict",
            "--slides",
            str(csv_path),
            "--work",
            str(w),
            "--run",
            str(run),
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pred.returncode == 0, pred.stderr
    rows = (run / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(entries)
    assert (run / "attention" / "s1.h5").is_file()
    # again: every slide current (same checkpoint and patch store): nothing encoded again
    again = subprocess.run(pred.args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"0 done, {len(entries)} up to date" in again.stderr
    assert (run / "predictions.csv").read_text().strip().splitlines() == rows


@pytest.mark.gpu
def test_train_e2e_on_cuda_and_its_encoder_on_cpu(work, tmp_path: Path) -> None:
    """End-to-end training on CUDA (bf16 autocast, channels_last) runs and learns finite
    losses; its encoder's bag features on CUDA are as close to the float32 CPU ones as bf16
    autocast allows: within twice the error of bf16 autocast on the CPU (~4.5 % relative on
    this tiny encoder; fp16 would give ~0.5 %), where a real mismatch (preprocessing,
    normalisation, weights) gives errors of order 1."""
    import pandas as pd

    w, entries = work
    run = train_e2e(
        make_cfg(w, tmp_path / "run", device="cuda", augment=True), entries, progress=False
    )
    hist = pd.read_csv(run / "metrics.csv")
    assert len(hist) == 2 and np.isfinite(hist["train_loss"]).all()
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ck["epoch"] == 2
    on_cuda = E2EEncoder(run, "cuda")
    on_cpu = E2EEncoder(run, "cpu")
    cpu_bf16 = E2EEncoder(run, "cpu")
    cpu_bf16.amp_dtype = torch.bfloat16  # CUDA's autocast dtype, on the CPU
    for entry in entries[:2]:
        ref = on_cpu.encode(entry, w)
        a, b = on_cuda.encode(entry, w), cpu_bf16.encode(entry, w)
        assert np.array_equal(a.coords, ref.coords)
        scale = np.linalg.norm(ref.features)
        err_cuda = np.linalg.norm(a.features - ref.features) / scale
        err_bf16 = np.linalg.norm(b.features - ref.features) / scale
        assert err_cuda < max(2 * err_bf16, 1e-2), (entry.slide_id, err_cuda, err_bf16)


def test_slide_without_patches_is_left_out_with_a_warning(work, tmp_path: Path, caplog) -> None:
    """A slide where tile found no tissue has an empty store: training leaves it out (the
    tile stage already warned) instead of stopping the run."""
    import logging

    w, entries = work
    patches = tmp_path / "w" / "patches"
    patches.mkdir(parents=True)
    for e in entries:
        (patches / f"{e.slide_id}.zarr").symlink_to(w / "patches" / f"{e.slide_id}.zarr")
    attrs = {"level": 0, "downsample": 1.0, "patch_size": P, "level0_width": 64,
             "level0_height": 64, "slide_path": ""}  # fmt: skip
    with PatchStoreWriter(patches / "blank.zarr", np.zeros((0, 2), np.int64), attrs) as wr:
        wr.commit()
    with_blank = [*entries, SlideEntry("blank", None, 1, "train")]
    with caplog.at_level(logging.WARNING):
        run = train_e2e(
            make_cfg(tmp_path / "w", tmp_path / "run", epochs=1), with_blank, progress=False
        )
    assert "1 slides have no patches" in caplog.text and "blank" in caplog.text
    assert "blank" not in (run / "splits.csv").read_text()
    assert (run / "checkpoints" / "last.pt").is_file()
