"""pipelines/Snakefile: dry runs show the expected jobs; a real local run == the stages by hand;
an interrupted train resumes (never restarts, never passes a half-trained model on); edits of
the config or of labels rerun what they change, no more."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pipeline_helpers import PROFILES, REPO, SNAKEFILE, pipeline_env, write_config

from wsi_mil.features import open_features
from wsi_mil.slides import read_slide_table
from wsi_mil.tiling.patch_store import PatchStore
from wsi_mil.workflow import features_dir

pytest.importorskip(
    "snakemake", reason="the workflow extra is not installed: pip install 'wsi-mil[workflow]'"
)
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def snakemake(cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "-s", str(SNAKEFILE), "--configfile", "cfg.yaml", *args],
        cwd=cwd,
        env=pipeline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_counts(stdout: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake run."""
    block = stdout.split("Job stats:")[1]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", block, re.M) if m[0] != "total"}


def jobs_of(stdout: str) -> dict[str, list[str]]:
    """rule -> the printed blocks (input/output/resources/shell command) of its jobs."""
    out: dict[str, list[str]] = {}
    for block in re.split(r"^rule ", stdout, flags=re.M)[1:]:
        name, _, body = block.partition(":")
        out.setdefault(name, []).append(body.split("\n\n")[0])
    return out


def shell_of(block: str) -> str:
    return block.split("Shell command: ", 1)[1].strip()


def ids_of(folder: Path) -> list[str]:
    return [e.slide_id for e in read_slide_table(folder / "slides" / "slides.csv")]


def test_dry_run_shows_per_slide_jobs(workdir):
    n = len(read_slide_table(workdir / "slides" / "slides.csv"))
    r = snakemake(workdir, "-n", "--profile", str(PROFILES / "local"))
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    counts = job_counts(r.stdout)
    assert counts == {
        "tile": n,
        "extract": n,
        "train": 1,
        "predict": 1,
        "heatmap": 1,
        "all": 1,
    }, r.stdout[-3000:]
    # each job is the stage command with the same --config (+ its one-slide table)
    assert "-m wsi_mil -q tile --config" in r.stdout and "--shard 0/1" in r.stdout
    feats = features_dir(workdir / "cfg.yaml")
    assert f"{feats}/synth_000.h5" in r.stdout
    assert not (workdir / "work" / "patches").exists()


def test_dry_run_with_slurm_profile_asks_for_gpus(workdir):
    r = snakemake(workdir, "-n", "--profile", str(PROFILES / "slurm"))
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    extract = r.stdout.split("rule extract:")[1].split("rule ")[0]
    assert "gpu=1" in extract and "mem_mb=32000" in extract
    train = r.stdout.split("rule train:")[1].split("rule ")[0]
    assert "gpu=4" in train and "torch.distributed.run" in train
    assert _train_ranks_and_threads(shell_of(train))[0] == 4  # torchrun ranks


def test_dry_run_of_the_demo_config_starts_with_synth(tmp_path):
    shutil.copy(REPO / "configs" / "demo.yaml", tmp_path / "cfg.yaml")
    r = snakemake(tmp_path, "-n", "--cores", "2")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    counts = job_counts(r.stdout)
    assert counts.get("synth") == 1 and counts.get("all") == 1, r.stdout[-2000:]
    assert "checkpoint jobs" in r.stdout  # the per-slide jobs appear once synth has run


@pytest.mark.slow
def test_local_run_equals_stage_commands_by_hand(workdir):
    """snakemake --cores 2 on 4 tiny slides == tile/extract/train/predict run by hand."""
    by_hand = workdir.parent / f"{workdir.name}-hand"
    shutil.copytree(workdir / "slides", by_hand / "slides")
    shutil.copy(workdir / "cfg.yaml", by_hand / "cfg.yaml")
    for stage in ("tile", "extract", "train", "predict"):
        h = subprocess.run(
            [sys.executable, "-m", "wsi_mil", "-q", stage, "--config", "cfg.yaml"],
            cwd=by_hand,
            env=pipeline_env(),
            capture_output=True,
            text=True,
        )
        assert h.returncode == 0, (stage, h.stderr[-2000:])

    r = snakemake(workdir, "--cores", "2", "--profile", str(PROFILES / "local"))
    assert r.returncode == 0, r.stderr[-4000:]
    pngs = {p.name for p in (workdir / "run" / "heatmaps").glob("*.png")}
    assert {f"{sid}.png" for sid in ids_of(workdir)} <= pngs, pngs

    ids = [e.slide_id for e in read_slide_table(workdir / "slides" / "slides.csv")]
    feats = features_dir(workdir / "cfg.yaml")
    for sid in ids:
        a = PatchStore.open(workdir / "work" / "patches" / f"{sid}.zarr")
        b = PatchStore.open(by_hand / "work" / "patches" / f"{sid}.zarr")
        assert np.array_equal(a.coords, b.coords) and len(a) > 0
        assert np.array_equal(a.pixels(0, len(a)), b.pixels(0, len(b)))
        fa, fb = (
            open_features(workdir / feats / f"{sid}.h5"),
            open_features(by_hand / feats / f"{sid}.h5"),
        )
        assert np.array_equal(fa.coords, fb.coords)
        assert np.allclose(fa.features, fb.features, atol=1e-6, rtol=0)
    wa = torch.load(workdir / "run/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(by_hand / "run/checkpoints/last.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    pa = pd.read_csv(workdir / "run" / "predictions.csv").sort_values("slide_id")
    pb = pd.read_csv(by_hand / "run" / "predictions.csv").sort_values("slide_id")
    assert list(pa.slide_id) == list(pb.slide_id) == sorted(ids)
    assert np.allclose(pa.prob, pb.prob, atol=1e-6)

    # nothing left to do: a second snakemake run schedules no job
    again = snakemake(workdir, "--cores", "2", "--profile", str(PROFILES / "local"))
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_dry_run_train_is_resumable_behind_a_marker(workdir):
    """train's output is R/.train-done (touched after `wsi-mil train` exits 0), not last.pt
    or metrics.csv, which Snakemake would delete before a rerun; train gets --resume; predict
    waits for the marker; every job turns HDF5 file locking off."""
    r = snakemake(workdir, "-n", "--profile", str(PROFILES / "local"))
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    jobs = jobs_of(r.stdout)
    (train,) = jobs["train"]
    assert re.search(r"^\s*output: run/\.train-done$", train, re.M), train
    cmd = shell_of(train)
    assert re.search(r"train --config \S+cfg\.yaml --resume; fi; touch run/\.train-done$", cmd)
    (predict,) = jobs["predict"]
    assert "run/.train-done" in predict.split("output:")[0] and "last.pt" not in predict
    for rule, blocks in jobs.items():
        for b in blocks:
            if rule != "all":
                assert shell_of(b).startswith("export HDF5_USE_FILE_LOCKING=FALSE; "), (rule, b)


def _train_ranks_and_threads(cmd: str) -> tuple[int, int]:
    """Run the part of train's command that picks the ranks and threads per rank."""
    m = re.search(r"(ranks=.*?export OMP_NUM_THREADS=\$\(\([^)]*\)\));", cmd)
    assert m, cmd
    out = subprocess.run(
        ["bash", "-c", m.group(1) + '; echo "$ranks $OMP_NUM_THREADS"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_gpu_settings_of_the_config_apply_with_the_local_profile(workdir):
    """`workflow: gpu: {train: 2}` means 2 torchrun ranks locally (the local profile used to
    cap every job at gpu=0), each with half of train's threads; --resources gpu=0 gives one
    process, never `--nproc-per-node 0`."""
    cfg = workdir / "cfg.yaml"
    cfg.write_text(
        cfg.read_text() + "workflow:\n  threads: {train: 8}\n  gpu: {extract: 1, train: 2}\n"
    )
    local = ("-n", "--cores", "8", "--profile", str(PROFILES / "local"))
    r = snakemake(workdir, *local)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    (train,) = jobs_of(r.stdout)["train"]
    assert "gpu=2" in train
    assert '--nproc-per-node "$ranks"' in shell_of(train)
    assert _train_ranks_and_threads(shell_of(train)) == (2, 4)
    assert all("gpu=1" in b for b in jobs_of(r.stdout)["extract"])

    r = snakemake(workdir, *local, "--resources", "gpu=0")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    (train,) = jobs_of(r.stdout)["train"]
    assert _train_ranks_and_threads(shell_of(train)) == (1, 8)
    assert "--nproc-per-node 0" not in r.stdout


def test_one_slides_features_of_a_synth_config(tmp_path):
    """Asking for one feature file when the slide table comes from the synth checkpoint
    (tile/extract params read the table: it must be their input)."""
    (tmp_path / "cfg.yaml").write_text(
        "slides: s/slides.csv\nwork: W\nsynth:\n  out: s\n  n-slides: 3\n  width: 256\n"
        "  height: 256\n  format: png\n"
    )
    feats = features_dir(tmp_path / "cfg.yaml")
    r = snakemake(tmp_path, "-n", "--cores", "2", f"{feats}/synth_001.h5")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert job_counts(r.stdout) == {"synth": 1, "tile": 1, "extract": 1}, r.stdout[-2000:]


LOCAL = ("--cores", "2", "--profile", str(PROFILES / "local"))


def _metrics_rows(run: Path) -> list[str]:
    p = run / "metrics.csv"
    return p.read_text().splitlines()[1:] if p.is_file() else []


def _nothing_to_do(cwd: Path) -> None:
    r = snakemake(cwd, *LOCAL)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout[-2000:]


def _dry_counts(cwd: Path) -> dict[str, int]:
    r = snakemake(cwd, "-n", *LOCAL)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    if "Nothing to be done" in r.stdout + r.stderr:
        return {}
    return job_counts(r.stdout)


@pytest.mark.slow
def test_half_trained_run_is_resumed_not_passed_on(workdir):
    """last.pt and metrics.csv of an interrupted training (here: 2 of 4 epochs, trained by
    hand) are not 'train done': Snakemake runs train, which resumes at epoch 2 (the config
    does not say `resume: true`), and predict scores the finished model."""
    cfg = workdir / "cfg.yaml"
    text = cfg.read_text().replace("  resume: true\n", "").replace("epochs: 2", "epochs: 4")
    cfg.write_text(text + "workflow:\n  quiet: false\n")
    r = snakemake(workdir, *LOCAL, "--until", "extract")
    assert r.returncode == 0, r.stderr[-3000:]
    h = subprocess.run(
        [sys.executable, "-m", "wsi_mil", "-q", "train", "--config", "cfg.yaml", "--epochs", "2"],
        cwd=workdir,
        env=pipeline_env(),
        capture_output=True,
        text=True,
    )
    assert h.returncode == 0, h.stderr[-2000:]
    run = workdir / "run"
    first = _metrics_rows(run)
    assert len(first) == 2

    r = snakemake(workdir, *LOCAL)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed run/checkpoints/last.pt at epoch 2/4" in r.stderr, r.stderr[-4000:]
    rows = _metrics_rows(run)
    assert len(rows) == 4 and rows[:2] == first
    assert (run / ".train-done").is_file() and (run / "predictions.csv").is_file()
    assert "stopped at epoch" not in r.stderr  # predict's warning about an unfinished model
    _nothing_to_do(workdir)


@pytest.mark.slow
def test_killed_train_job_resumes_with_a_synth_config(tmp_path):
    """kill -9 of snakemake (and its jobs) while train runs, then --unlock and run again:
    train continues from the last epoch it finished, and a rerun after that has nothing
    to do. With a `synth:` section the rerun used to skip train and predict with the
    half-trained model; without one, train started again from epoch 1."""
    write_config(
        tmp_path,
        Path("slides/slides.csv"),
        "synth:\n  out: slides\n  n-slides: 4\n  width: 768\n  height: 768\n  format: tiff\n"
        "  markers-min: 1\n  markers-max: 2\n  splits: train=0.5,val=0.5\n  seed: 3\n"
        "  workers: 1\nworkflow:\n  quiet: false\n",
    )
    cfg = tmp_path / "cfg.yaml"
    epochs = 300
    cfg.write_text(cfg.read_text().replace("epochs: 2", f"epochs: {epochs}"))
    run = tmp_path / "run"
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 - closed below
    p = subprocess.Popen(
        [SNAKEMAKE, "-s", str(SNAKEFILE), "--configfile", "cfg.yaml", *LOCAL],
        cwd=tmp_path,
        env=pipeline_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while len(_metrics_rows(run)) < 10 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        log.close()
    done = _metrics_rows(run)
    assert 10 <= len(done) < epochs and not (run / ".train-done").exists()

    r = snakemake(tmp_path, *LOCAL)
    assert r.returncode != 0 and "--unlock" in r.stdout + r.stderr  # the killed run's lock
    assert snakemake(tmp_path, "--unlock", *LOCAL).returncode == 0
    assert job_counts(snakemake(tmp_path, "-n", *LOCAL).stdout).get("train") == 1

    r = snakemake(tmp_path, *LOCAL)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "starting from epoch 1" not in r.stderr
    assert f"resumed run/checkpoints/last.pt at epoch {len(done)}/{epochs}" in r.stderr, r.stderr[
        -4000:
    ]
    rows = _metrics_rows(run)
    assert len(rows) == epochs and rows[: len(done)] == done
    _nothing_to_do(tmp_path)


@pytest.mark.slow
def test_edits_of_the_config_and_labels_rerun_what_they_change(workdir):
    n = 4
    r = snakemake(workdir, *LOCAL)
    assert r.returncode == 0, r.stderr[-4000:]
    cfg = workdir / "cfg.yaml"
    text = cfg.read_text()
    after_train = {"train": 1, "predict": 1, "heatmap": 1, "all": 1}

    cfg.write_text(text.replace("epochs: 2", "epochs: 3"))
    assert _dry_counts(workdir) == after_train
    cfg.write_text(text.replace("patch-size: 96", "patch-size: 64"))
    assert _dry_counts(workdir) == {"tile": n, "extract": n, **after_train}
    cfg.write_text(text.replace("batch-size: 32", "batch-size: 32\n  dtype: float16"))
    assert _dry_counts(workdir) == {"extract": n, **after_train}
    for how in (("  workers: 1\n", "  workers: 2\n"), ("batch-size: 32", "batch-size: 16")):
        cfg.write_text(text.replace(*how))  # how, not what: no rerun
        assert _dry_counts(workdir) == {}
    cfg.write_text(text)

    # labels of the training slides: train and what follows, no per-slide job
    table = workdir / "slides" / "slides.csv"
    rows = table.read_text()
    assert "synth_001,synth_001.tiff,1,train" in rows and "synth_003,synth_003.tiff,0,train" in rows
    rows = rows.replace("synth_001.tiff,1,", "synth_001.tiff,0,")
    table.write_text(rows.replace("synth_003.tiff,0,", "synth_003.tiff,1,"))
    assert _dry_counts(workdir) == after_train
    # ... and train does not resume a model trained on the old label
    last = (workdir / "run" / "checkpoints" / "last.pt").read_bytes()
    r = snakemake(workdir, *LOCAL)
    assert r.returncode != 0
    assert "other labels for 2 slide(s) (synth_001, synth_003)" in r.stderr, r.stderr[-3000:]
    assert "overwrite: true" in r.stderr
    assert (workdir / "run" / "checkpoints" / "last.pt").read_bytes() == last
    cfg.write_text(text.replace("train:\n", "train:\n  overwrite: true\n"))
    r = snakemake(workdir, *LOCAL)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "synth_001,0,train" in (workdir / "run" / "splits.csv").read_text()
    _nothing_to_do(workdir)
