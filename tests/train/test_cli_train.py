"""`wsi-mil train` / `wsi-mil predict` through the real CLI (subprocesses), incl. SIGKILL + --resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from bag_factory import make_bags, write_bags, write_table

ENV = {"OMP_NUM_THREADS": "1"}


def _data(tmp_path, n_bags=24, n_min=20, n_max=40, **kw):
    bags = make_bags(n_bags, dim=8, n_min=n_min, n_max=n_max, **kw)
    write_bags(bags, tmp_path / "feats")
    return bags, write_table(bags, tmp_path / "slides.csv")


def _train_args(tmp_path, csv_path, run="run", *extra):
    return ("-q", "train", "--slides", str(csv_path), "--work", str(tmp_path / "w"), "--run", str(tmp_path / run),
            "--features", str(tmp_path / "feats"), "--device", "cpu", *extra)  # fmt: skip


def _one_error_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_train_then_predict(cli, tmp_path):
    bags, table = _data(tmp_path)
    r = cli(
        *_train_args(tmp_path, table, "run", "--epochs", "3", "--gated", "--dropout", "0.1"),
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3
    r = cli(
        "-q",
        "predict",
        "--slides",
        str(table),
        "--work",
        str(tmp_path / "w"),
        "--run",
        str(run),
        "--threshold",
        "0.3",
        "--device",
        "cpu",
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    preds = pd.read_csv(run / "predictions.csv")
    assert list(preds.columns) == ["slide_id", "label", "prob", "split"] and len(preds) == 24
    m = json.loads((run / "metrics.json").read_text())
    assert m["threshold"] == 0.3 and m["overall"]["n"] == 24
    assert len(list((run / "attention").glob("*.h5"))) == 24


def test_config_file_and_missing_stores(cli, tmp_path):
    """Options from --config; slides without a store are skipped with a warning naming them."""
    bags, table = _data(tmp_path, n_bags=12)
    for b in bags[:2]:
        (tmp_path / "feats" / f"{b.slide_id}.h5").unlink()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 2\n  gated: true\n  val-frac: 0.0\n")
    r = cli(*_train_args(tmp_path, table), "--config", str(cfg), env=ENV)
    assert r.returncode == 0, r.stderr
    assert "bag000" in r.stderr and "bag001" in r.stderr and "skipped" in r.stderr
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 2" in saved and "gated: true" in saved and "val_frac: 0.0" in saved
    assert len(pd.read_csv(tmp_path / "run" / "splits.csv")) == 10
    assert len(list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))) == 2


def test_bad_inputs_exit_2_with_one_line(cli, tmp_path):
    bags, table = _data(tmp_path, n_bags=8)
    # label not 0/1
    bad = tmp_path / "bad_label.csv"
    bad.write_text("slide_id,path,label\nbag000,,0\nbag001,,2\n")
    _one_error_line(cli(*_train_args(tmp_path, bad), env=ENV), "label '2'")
    # no store for any slide
    none = tmp_path / "none.csv"
    none.write_text("slide_id,path,label\nzz1,,0\nzz2,,1\n")
    r = cli(*_train_args(tmp_path, none), env=ENV)
    assert r.returncode == 2 and "none of the 2 slides" in r.stderr.splitlines()[-1]
    # NaN features in one slide
    with h5py.File(tmp_path / "feats" / "bag005.h5", "r+") as f:
        f["features"][3, 1] = np.nan
    _one_error_line(cli(*_train_args(tmp_path, table), env=ENV), "bag005", "NaN")
    # mixed feature widths
    write_bags(make_bags(8, dim=16, n_min=5, n_max=9)[5:6], tmp_path / "feats")
    _one_error_line(cli(*_train_args(tmp_path, table), env=ENV), "different widths", "D=8", "D=16")


def test_one_class_training_split_and_existing_run(cli, tmp_path):
    bags, _ = _data(tmp_path, n_bags=8)
    one = write_table(bags, tmp_path / "one.csv", ["val" if b.label else "train" for b in bags])
    _one_error_line(cli(*_train_args(tmp_path, one), env=ENV), "only label 0")
    table = write_table(bags, tmp_path / "ok.csv")
    assert cli(*_train_args(tmp_path, table, "run", "--epochs", "1"), env=ENV).returncode == 0
    _one_error_line(
        cli(*_train_args(tmp_path, table, "run", "--epochs", "1"), env=ENV),
        "already holds a run",
        "--resume",
    )
    _one_error_line(
        cli("-q", "predict", "--slides", str(table), "--run", str(tmp_path / "nope"), env=ENV),
        "not a training run folder",
    )


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(cli, tmp_path):
    _, table = _data(tmp_path, n_bags=40, n_min=200, n_max=400)
    opts = ("--epochs", "12", "--dropout", "0.2", "--seed", "3", "--patience", "0")
    r = cli(*_train_args(tmp_path, table, "full", *opts), env=ENV)
    assert r.returncode == 0, r.stderr

    cmd = [sys.executable, "-m", "wsi_mil", *_train_args(tmp_path, table, "cut", *opts)]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    metrics = tmp_path / "cut" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 4:  # header + >= 3 epochs
            break
        assert proc.poll() is None, (
            f"training ended before it could be killed: {proc.stderr.read()}"
        )
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before the kill: make the epochs longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert 3 <= done < 12

    r = cli(*_train_args(tmp_path, table, "cut", *opts, "--resume"), env=ENV)
    assert r.returncode == 0, r.stderr
    for name in ("last.pt", "best.pt"):
        a = torch.load(tmp_path / "full" / "checkpoints" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / "checkpoints" / name, weights_only=True)
        assert a["epoch"] == b["epoch"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    assert (
        not list((tmp_path / "cut" / "checkpoints").glob(".*tmp*")) or True
    )  # stale temp files are allowed


def test_overwrite_removes_every_output_of_the_previous_model(cli, tmp_path):
    """train --overwrite: predictions, metrics, attention files, ROC plot, heatmaps and the
    localisation report of the old model must not stay behind looking current."""
    _, table = _data(tmp_path, n_bags=8, n_min=5, n_max=9)
    run = tmp_path / "run"
    pred = ("-q", "predict", "--slides", str(table), "--work", str(tmp_path / "w"), "--run", str(run), "--device", "cpu")  # fmt: skip
    assert cli(*_train_args(tmp_path, table, "run", "--epochs", "2"), env=ENV).returncode == 0
    r = cli(*pred, env=ENV)
    assert r.returncode == 0, r.stderr
    r = cli("-q", "heatmap", "--run", str(run), "--top-k", "0", env=ENV)
    assert r.returncode == 0, r.stderr
    (run / "localisation.json").write_text("{}\n")  # as heatmap writes it where markers are known
    old = [
        "predictions.csv",
        "metrics.json",
        "localisation.json",
        "plots/roc.png",
        "attention/bag000.h5",
        "heatmaps/bag000.png",
    ]
    assert all((run / p).is_file() for p in old)

    r = cli(*_train_args(tmp_path, table, "run", "--epochs", "3", "--overwrite"), env=ENV)
    assert r.returncode == 0, r.stderr
    assert [p for p in old if (run / p).exists()] == []
    assert not (run / "attention").exists() and not (run / "heatmaps").exists()
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3
    r = cli("-q", "heatmap", "--run", str(run), env=ENV)  # nothing to draw until predict reruns
    assert r.returncode == 2 and "wsi-mil predict" in r.stderr
    r = cli(*pred, env=ENV)
    assert r.returncode == 0, r.stderr
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert json.loads((run / "metrics.json").read_text())["epoch"] == best["epoch"]


def test_resume_typed_on_the_command_line_beats_overwrite_in_the_config(cli, tmp_path):
    """'sbatch ... --resume' after a time-out, with 'overwrite: true' left in the config
    (as advised for one run): the command line wins, the run resumes; in the config alone
    overwrite wins (a config keeps 'resume: true' for 'wsi-mil run')."""
    _, table = _data(tmp_path, n_bags=8, n_min=5, n_max=9)
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  overwrite: true\n  resume: true\n")
    assert cli(*_train_args(tmp_path, table, "run", "--epochs", "2"), env=ENV).returncode == 0
    first = list(csv.DictReader(open(run / "metrics.csv")))
    r = cli(*_train_args(tmp_path, table, "run", "--epochs", "3", "--config", str(cfg), "--resume"), env=ENV)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "starts afresh" not in r.stderr
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert rows[:2] == first[:2]  # epochs 1-2 are the first run's (times too): resumed at 3
    r = cli(*_train_args(tmp_path, table, "run", "--epochs", "3", "--config", str(cfg)), env=ENV)
    assert r.returncode == 0, r.stderr
    assert "starts afresh" in r.stderr  # a warning, shown with -q
