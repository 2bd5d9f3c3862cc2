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


def _submit(tmp_path, config_text, *args):
    """Run submit.sh on a config with the fake sbatch: [(job id, sbatch arguments)]."""
    bindir = _fake_sbatch(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text)
    log = tmp_path / "sbatch.log"
    env = {**pipeline_env(), "SBATCH_LOG": str(log), "PYTHON": sys.executable}
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    r = subprocess.run(
        ["bash", str(SLURM / "submit.sh"), str(cfg), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return [ln.split(" ", 1) for ln in log.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["cached", "e2e"])
def test_submit_chains_jobs_with_dependencies(tmp_path, mode):
    jobs = _submit(tmp_path, f"slides: s.csv\ntrain:\n  mode: {mode}\n", "6", "3")
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
    cfg = workdir / "cfg.yaml"  # no 'resume: true': train.sbatch resumes by itself
    cfg.write_text(cfg.read_text().replace("  resume: true\n", ""))
    r = _bash("train.sbatch", workdir, {**env_train, "GPUS": "2"}, "cfg.yaml", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: 2 ranks" in r.stdout
    # submitted again (e.g. after a time-out): finds the run finished instead of refusing
    last = (workdir / "run" / "checkpoints" / "last.pt").read_bytes()
    r = _bash("train.sbatch", workdir, {**env_train, "GPUS": "2"}, "cfg.yaml", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (workdir / "run" / "checkpoints" / "last.pt").read_bytes() == last
    r = _bash("predict.sbatch", workdir, env_train, "cfg.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    preds = pd.read_csv(workdir / "run" / "predictions.csv")
    assert len(preds) == 4 and preds.prob.between(0, 1).all()
    assert len(list((workdir / "run" / "heatmaps").glob("synth_*.png"))) >= 4


def _array_env(**slurm: str) -> dict[str, str]:
    """Env of a template whose wsi-mil is `echo` (prints the command it would run)."""
    env = {
        k: v for k, v in pipeline_env().items() if not k.startswith(("SLURM_", "WSI_MIL_SHARDS"))
    }
    return {**env, "WSI_MIL": "echo", **slurm}


@pytest.mark.parametrize("script", ["tile.sbatch", "extract.sbatch"])
def test_array_templates_shard_every_way_they_are_submitted(tmp_path, script):
    def shard(**slurm: str) -> subprocess.CompletedProcess:
        return _bash(script, tmp_path, _array_env(**slurm), "cfg.yaml")

    def arr(ids: list[int]) -> dict[str, str]:  # the SLURM_ARRAY_* of a task of --array=ids
        return {
            "SLURM_ARRAY_TASK_COUNT": str(len(ids)),
            "SLURM_ARRAY_TASK_MIN": str(min(ids)),
            "SLURM_ARRAY_TASK_MAX": str(max(ids)),
        }

    # no --array at all (set -u used to stop on SLURM_ARRAY_TASK_ID): one shard, all slides
    r = shard()
    assert r.returncode == 0 and r.stdout.splitlines()[-1].endswith("--shard 0/1"), r.stderr
    # a whole array, 0- or 1-based
    for ids, tid, want in (([0, 1, 2], 2, "2/3"), ([1, 2, 3], 1, "0/3"), ([1, 2, 3], 3, "2/3")):
        r = shard(SLURM_ARRAY_TASK_ID=str(tid), **arr(ids))
        assert r.returncode == 0 and r.stdout.splitlines()[-1].endswith(f"--shard {want}")
    # a resubmission of tasks 0 and 2 of 3: refused without WSI_MIL_SHARDS (shard 2/2 does not exist)
    r = shard(SLURM_ARRAY_TASK_ID="2", **arr([0, 2]))
    assert r.returncode == 2 and "WSI_MIL_SHARDS" in r.stderr, r.stdout + r.stderr
    # ... and right with it, as is one task (--array=2) or a stepped range (0-5:2)
    for ids, tid in (([0, 2], 2), ([2], 2), ([0, 2, 4], 4)):
        r = shard(SLURM_ARRAY_TASK_ID=str(tid), WSI_MIL_SHARDS="6", **arr(ids))
        assert r.returncode == 0 and r.stdout.splitlines()[-1].endswith(f"--shard {tid}/6")
    # a single index without WSI_MIL_SHARDS: one shard of one, i.e. every slide not yet current
    r = shard(SLURM_ARRAY_TASK_ID="2", **arr([2]))
    assert r.returncode == 0 and r.stdout.splitlines()[-1].endswith("--shard 0/1")


def _fake_python(tmp_path: Path) -> Path:
    """A `python` for train.sbatch: runs `-c` snippets for real, prints `-m` command lines."""
    fake = tmp_path / "fakepython"
    fake.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
        'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS HDF5=$HDF5_USE_FILE_LOCKING python $*"\n'
    )
    fake.chmod(0o755)
    return fake


def test_train_template_resumes_and_shares_the_cpus(tmp_path):
    """A second submission of train.sbatch continues the run (--resume), unless the config
    asks to start afresh; each torchrun rank gets CPUS / GPUS threads; never 0 ranks."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("slides: s.csv\ntrain:\n  epochs: 3\n")
    env = {**pipeline_env(), "PYTHON": str(_fake_python(tmp_path)), "SLURM_CPUS_PER_TASK": "8"}

    r = _bash("train.sbatch", tmp_path, {**env, "GPUS": "4"}, str(cfg), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[-1]
    assert line.startswith("OMP_NUM_THREADS=2 HDF5=FALSE python -m torch.distributed.run")
    assert "--nproc-per-node 4" in line
    assert line.endswith(f"-m -- wsi_mil -q train --config {cfg} --resume --device cpu")

    for gpus in ("1", "0"):
        r = _bash("train.sbatch", tmp_path, {**env, "GPUS": gpus}, str(cfg))
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == (
            f"OMP_NUM_THREADS=8 HDF5=FALSE python -m wsi_mil -q train --config {cfg} --resume"
        )

    cfg.write_text("slides: s.csv\ntrain:\n  overwrite: true\n")
    r = _bash("train.sbatch", tmp_path, {**env, "GPUS": "1"}, str(cfg))
    assert r.returncode == 0 and "--resume" not in r.stdout.splitlines()[-1], r.stdout


def test_submit_makes_the_slides_of_a_synth_config_first(tmp_path):
    jobs = _submit(tmp_path, "slides: s/slides.csv\nsynth:\n  out: s\n  n-slides: 2\n", "2", "2")
    assert [Path(a.split()[-2]).name for _, a in jobs][:2] == ["synth.sbatch", "tile.sbatch"]
    assert f"--dependency=afterok:{jobs[0][0]}" in jobs[1][1]
