"""pipelines/slurm/*.sbatch run as SLURM would run them (bash + SLURM_* variables), on CPU."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pipeline_helpers import REPO, pipeline_env

SLURM = REPO / "pipelines" / "slurm"


def _bash(script: str, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_templates_are_valid_bash_and_executable():
    for p in SLURM.iterdir():
        assert os.access(p, os.X_OK), f"{p} is not executable"
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        if p.suffix == ".sbatch":
            assert "#SBATCH" in p.read_text()


def _fake_sbatch(tmp_path: Path) -> Path:
    """An ``sbatch`` that logs its arguments and prints a job id (like --parsable)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sb = bindir / "sbatch"
    sb.write_text(
        "#!/bin/bash\n"
        'n=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 100 ))\n'
        'echo "$n $*" >> "$SBATCH_LOG"\n'
        'echo "$n"\n'
    )
    sb.chmod(sb.stat().st_mode | stat.S_IEXEC)
    return bindir


@pytest.mark.parametrize("mode", ["cached", "e2e"])
def test_submit_chains_jobs_with_dependencies(tmp_path, mode):
    bindir = _fake_sbatch(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"slides: s.csv\ntrain:\n  mode: {mode}\n")
    log = tmp_path / "sbatch.log"
    env = {**pipeline_env(), "SBATCH_LOG": str(log), "PYTHON": sys.executable}
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    r = subprocess.run(
        ["bash", str(SLURM / "submit.sh"), str(cfg), "6", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    jobs = [ln.split(" ", 1) for ln in log.read_text().splitlines()]
    scripts = [Path(args.split()[-2]).name for _, args in jobs]
    if mode == "cached":
        assert scripts == ["tile.sbatch", "extract.sbatch", "train.sbatch", "predict.sbatch"]
        (tile, t_args), (extract, e_args), (train, tr_args), (_, p_args) = jobs
        assert "--array=0-5" in t_args and "--array=0-2" in e_args
        assert f"--dependency=afterany:{tile}" in e_args
        assert f"--dependency=afterany:{extract}" in tr_args
    else:  # end-to-end training reads the patch stores: no extract job
        assert scripts == ["tile.sbatch", "train.sbatch", "predict.sbatch"]
        (tile, _), (train, tr_args), (_, p_args) = jobs
        assert f"--dependency=afterany:{tile}" in tr_args
    assert f"--dependency=afterok:{train}" in p_args


@pytest.mark.slow
def test_sbatch_templates_run_the_pipeline_on_cpu(workdir):
    """tile/extract as 1-task arrays, train.sbatch with GPUS=2 -> torchrun 2 ranks (gloo), predict."""
    env = {
        **pipeline_env(),
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_ARRAY_TASK_COUNT": "1",
        "SLURM_CPUS_PER_TASK": "1",
        "WSI_MIL": f"{sys.executable} -m wsi_mil",
        "PYTHON": sys.executable,
    }
    (workdir / "logs").mkdir()
    for script in ("tile.sbatch", "extract.sbatch"):
        r = _bash(script, workdir, env, "cfg.yaml")
        assert r.returncode == 0, (script, r.stderr[-3000:])
    env_train = {k: v for k, v in env.items() if not k.startswith("SLURM_ARRAY")}
    r = _bash("train.sbatch", workdir, {**env_train, "GPUS": "2"}, "cfg.yaml", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: 2 ranks" in r.stdout
    r = _bash("predict.sbatch", workdir, env_train, "cfg.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    preds = pd.read_csv(workdir / "run" / "predictions.csv")
    assert len(preds) == 4 and preds.prob.between(0, 1).all()
    assert len(list((workdir / "run" / "heatmaps").glob("synth_*.png"))) >= 4
