"""pipelines/Snakefile: dry runs show the expected jobs; a real local run == the stages by hand."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pipeline_helpers import PROFILES, REPO, SNAKEFILE, pipeline_env

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
    assert "gpu=4" in train and "torch.distributed.run" in train and "--nproc-per-node 4" in train


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
