"""The SLURM job-array path and concurrent writers, with real processes.

* shards 0/3, 1/3, 2/3 of ``tile`` (through pipelines/slurm/tile.sbatch, as an array task
  would run it) and of ``extract`` (shard taken from SLURM_ARRAY_* alone), all in parallel,
  give exactly the stores of one unsharded run, and each slide is processed once;
* two processes started on the same shard at once leave valid stores identical to a
  single run's (per-output locks + atomic renames).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import REPO, pipeline_env

from wsi_mil.features import open_features
from wsi_mil.slides import read_slide_table
from wsi_mil.tiling.patch_store import PatchStore
from wsi_mil.workflow import features_dir

N_SHARDS = 3


def _clone(workdir: Path, name: str) -> Path:
    """A sibling folder with its own copy of the slides and the same config."""
    dst = workdir.parent / f"{workdir.name}-{name}"
    shutil.copytree(workdir / "slides", dst / "slides")
    shutil.copy(workdir / "cfg.yaml", dst / "cfg.yaml")
    return dst


def _wsi(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi_mil", "-q", *args]


def _run_all(cmds: list[list[str]], cwd: Path, envs: list[dict[str, str]]) -> list[tuple[int, str]]:
    """Start every command at once, wait for all; [(returncode, stderr)]."""
    procs = [
        subprocess.Popen(
            c, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c, e in zip(cmds, envs, strict=True)
    ]
    out = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        out.append((p.returncode, err))
    return out


def _done(stage: str, stderr: str) -> tuple[int, int]:
    """(done, not done here) from a stage's summary line: up to date, or left to another
    process that was writing them."""
    m = re.search(
        rf"^{stage}: (\d+) done, (\d+) up to date, (\d+) failed"
        r"(?:, (\d+) left to another process)?",
        stderr,
        re.M,
    )
    assert m, stderr[-2000:]
    assert m.group(3) == "0", stderr[-2000:]
    return int(m.group(1)), int(m.group(2)) + int(m.group(4) or 0)


def _reference(workdir: Path, env: dict[str, str] | None = None) -> Path:
    """One unsharded tile + extract. ``env``: as the runs compared with it (extract uses as
    many torch threads as the job has CPUs, and other thread counts sum in another order)."""
    ref = _clone(workdir, "ref")
    for stage in ("tile", "extract"):
        r = subprocess.run(
            _wsi(stage, "--config", "cfg.yaml"),
            cwd=ref,
            env=env or pipeline_env(),
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    return ref


def _assert_same_stores(a: Path, b: Path) -> None:
    ids = [e.slide_id for e in read_slide_table(a / "slides" / "slides.csv")]
    fa, fb = features_dir(a / "cfg.yaml"), features_dir(b / "cfg.yaml")
    assert fa == fb  # relative: W/features/<tag>
    for sid in ids:
        pa = PatchStore.open(a / "work" / "patches" / f"{sid}.zarr")
        pb = PatchStore.open(b / "work" / "patches" / f"{sid}.zarr")
        assert len(pa) == len(pb) > 0, sid
        assert np.array_equal(pa.coords, pb.coords), sid
        assert np.array_equal(pa.pixels(0, len(pa)), pb.pixels(0, len(pb))), sid
        xa, xb = open_features(a / fa / f"{sid}.h5"), open_features(b / fb / f"{sid}.h5")
        assert np.array_equal(xa.coords, xb.coords), sid
        # same patches, same encoder, same batches: bit-identical on CPU
        assert np.array_equal(xa.features, xb.features), sid
    for folder in (b / "work" / "patches", b / fb):
        assert not list(folder.glob(".*.tmp-*")), "temporary outputs left behind"
    assert not (b / "work" / "failures.csv").exists()


@pytest.mark.slow
def test_job_array_shards_equal_one_unsharded_run(workdir):
    ref = _reference(workdir, {**pipeline_env(), "SLURM_CPUS_PER_TASK": "1"})  # as the tasks
    arr = _clone(workdir, "array")
    n = len(read_slide_table(arr / "slides" / "slides.csv"))
    expect = [len(range(i, n, N_SHARDS)) for i in range(N_SHARDS)]

    def task_env(i: int) -> dict[str, str]:
        return {
            **pipeline_env(),
            "SLURM_ARRAY_TASK_ID": str(i + 1),  # --array=1-3: shards count from the first task
            "SLURM_ARRAY_TASK_MIN": "1",
            "SLURM_ARRAY_TASK_COUNT": str(N_SHARDS),
            "SLURM_CPUS_PER_TASK": "1",
            "WSI_MIL": f"{sys.executable} -m wsi_mil",
        }

    envs = [task_env(i) for i in range(N_SHARDS)]
    tile_sbatch = str(REPO / "pipelines" / "slurm" / "tile.sbatch")
    res = _run_all([["bash", tile_sbatch, "cfg.yaml"]] * N_SHARDS, arr, envs)
    for rc, err in res:
        assert rc == 0, err[-2000:]
    assert [_done("tile", err) for _, err in res] == [(k, 0) for k in expect]

    # extract: no --shard at all; each process takes its shard from SLURM_ARRAY_* itself
    res = _run_all([_wsi("extract", "--config", "cfg.yaml")] * N_SHARDS, arr, envs)
    for rc, err in res:
        assert rc == 0, err[-2000:]
    assert [_done("extract", err) for _, err in res] == [(k, 0) for k in expect]

    _assert_same_stores(ref, arr)


@pytest.mark.slow
def test_two_processes_on_the_same_shard(workdir):
    ref = _reference(workdir)
    twin = _clone(workdir, "twin")
    n = len(read_slide_table(twin / "slides" / "slides.csv"))
    env = pipeline_env()
    for stage in ("tile", "extract"):
        cmd = _wsi(stage, "--config", "cfg.yaml", "--shard", "0/1")
        res = _run_all([cmd, cmd], twin, [env, env])
        for rc, err in res:
            assert rc == 0, err[-2000:]
        counts = [_done(stage, err) for _, err in res]
        # every slide was written by exactly one of the two; the other skipped it
        assert sum(d for d, _ in counts) == n, counts
        assert all(d + s == n for d, s in counts), counts
    _assert_same_stores(ref, twin)
    # and a third run finds everything current
    r = subprocess.run(
        _wsi("extract", "--config", "cfg.yaml"), cwd=twin, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0 and _done("extract", r.stderr) == (0, n)
