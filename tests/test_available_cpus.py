"""available_cpus(): affinity, cgroup quota, SLURM_CPUS_PER_TASK, torchrun ranks per node."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from wsi_mil.batch import _cgroup_cpu_quota, available_cpus

CODE = "from wsi_mil.batch import available_cpus; print(available_cpus())"


def _cpus(env_extra: dict[str, str], prefix: str = "", drop: tuple[str, ...] = ()) -> int:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", *drop)
    }
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", prefix + CODE], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def test_baseline_is_affinity_or_less():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_slurm_cpus_per_task_caps_and_never_raises():
    base = _cpus({})
    assert _cpus({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert _cpus({"SLURM_CPUS_PER_TASK": "4096"}) == base  # cannot exceed what we may use
    assert _cpus({"SLURM_CPUS_PER_TASK": "junk"}) == base


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs in the affinity mask")
def test_affinity_mask_in_subprocess():
    assert (
        _cpus(
            {}, prefix="import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        )
        == 1
    )


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_torchrun_ranks_share_the_node():
    base = _cpus({})
    assert _cpus({"LOCAL_WORLD_SIZE": "2"}) == max(1, base // 2)
    assert _cpus({"LOCAL_WORLD_SIZE": "64"}) == 1
    assert _cpus({"LOCAL_WORLD_SIZE": "1"}) == base


def test_cgroup_quota_files(tmp_path):
    assert _cgroup_cpu_quota(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 1  # fractional quota still allows one worker
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None  # v1 unlimited
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert _cgroup_cpu_quota(tmp_path) == 4
