"""Batch plumbing: shards, atomic outputs, locks, failures.csv."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from batch_helpers import dies_on_die, outcome_by_name

from wsi_mil.batch import (
    atomic_path,
    available_cpus,
    output_lock,
    params_digest,
    parse_shard,
    record_failure,
    run_per_slide,
    shard_items,
)
from wsi_mil.errors import ConfigError


def test_parse_shard_spec_and_errors(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    assert parse_shard("1/3") == (1, 3)
    assert parse_shard(None) == (0, 1)
    for bad in ("3/3", "-1/2", "a/b", "2", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_parse_shard_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.delenv("SLURM_ARRAY_TASK_MIN", raising=False)
    assert parse_shard(None) == (2, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")  # --array=3-6
    assert parse_shard(None) == (2, 4)


def test_shards_are_disjoint_and_cover():
    items = [f"s{i:02d}" for i in range(17)]
    parts = [shard_items(items, (i, 4), key=str) for i in range(4)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    # independent of input order
    assert shard_items(list(reversed(items)), (1, 4), key=str) == parts[1]


def test_params_digest_order_independent():
    assert params_digest({"a": 1, "b": [1, 2]}) == params_digest({"b": [1, 2], "a": 1})
    assert params_digest({"a": 1}) != params_digest({"a": 2})


def test_atomic_path_file_and_dir(tmp_path):
    f = tmp_path / "out.txt"
    with atomic_path(f) as t:
        t.write_text("new")
    assert f.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(f) as t:
        t.write_text("half")
        raise RuntimeError("killed")
    assert f.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    d = tmp_path / "store.zarr"
    for content in ("one", "two"):
        with atomic_path(d) as t:
            t.mkdir()
            (t / "x").write_text(content)
    assert (d / "x").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "store.zarr"]


def test_output_lock_excludes_second_holder(tmp_path):
    target = tmp_path / "a.h5"
    with output_lock(target) as held:
        assert held
        code = (
            "import sys; from wsi_mil.batch import output_lock\n"
            f"with output_lock({str(target)!r}) as h: sys.exit(0 if not h else 3)\n"
        )
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    with output_lock(target) as held:
        assert held


def test_a_slide_another_process_is_writing_is_not_counted_up_to_date(tmp_path, cli):
    """Two runs on one work folder: a slide whose store the other run holds is reported as
    left to it, not as up to date (it is not written yet)."""
    from slide_factory import make_image, test_image

    slide = make_image(tmp_path / "a.png", test_image(64, 64, seed=1))
    args = ("tile", str(slide), "-w", "W", "--tissue", "none", "--patch-size", "32")
    with output_lock(tmp_path / "W" / "patches" / "a.zarr") as held:
        assert held
        r = cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "0 done, 0 up to date, 0 failed, 1 left to another process writing them" in r.stderr
    assert not (tmp_path / "W" / "patches" / "a.zarr").exists()
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 0 and "1 done, 0 up to date, 0 failed" in r.stderr, r.stderr


def test_output_lock_leaves_no_lock_files(tmp_path):
    target = tmp_path / "patches" / "a.zarr"
    with output_lock(target) as held:
        assert held and (tmp_path / "patches" / "a.zarr.lock").exists()
    assert list((tmp_path / "patches").iterdir()) == []
    with pytest.raises(RuntimeError), output_lock(target):
        raise RuntimeError("slide failed")
    assert list((tmp_path / "patches").iterdir()) == []
    # a SIGKILLed holder's lock file is reused, then removed
    (tmp_path / "patches" / "a.zarr.lock").write_text("")
    with output_lock(target) as held:
        assert held
    assert list((tmp_path / "patches").iterdir()) == []
    # a hidden .locks folder goes once empty, stays while another output is locked in it
    locks = tmp_path / "heatmaps" / ".locks"
    with output_lock(locks / "a.png") as a:
        with output_lock(locks / "b.png") as b:
            assert a and b
        assert [p.name for p in locks.iterdir()] == ["a.png.lock"]
    assert list((tmp_path / "heatmaps").iterdir()) == []


_HAMMER = r"""
import os, sys, time
from wsi_mil.batch import output_lock
target, inside, log, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for i in range(n):
    with output_lock(target, blocking=i % 2 == 0) as held:
        if not held:
            continue
        fd = os.open(inside, os.O_CREAT | os.O_EXCL)  # FileExistsError: two holders at once
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {i}\n")
        time.sleep(0.0005)
        os.close(fd)
        os.unlink(inside)
"""


def test_output_lock_unlink_on_release_keeps_mutual_exclusion(tmp_path):
    """Holders unlink the lock file on release; waiters on the old inode must not slip in."""
    target, inside, log = tmp_path / "out.h5", tmp_path / "inside", tmp_path / "log"
    n_proc, n_iter = 4, 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, str(target), str(inside), str(log), str(n_iter)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n_proc)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errs)
    n_entries = len(log.read_text().splitlines())
    assert n_entries >= n_proc * n_iter // 2  # every blocking attempt got the lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


@pytest.mark.parametrize("processes", [1, 2])
def test_run_per_slide_records_failures(tmp_path, processes):
    res = run_per_slide(
        "tile",
        ["a", "bad", "old", "empty", "boom"],
        outcome_by_name,
        tmp_path,
        slide_id=str,
        progress=False,
        processes=processes,
    )
    assert sorted(res.done) == ["a", "empty"] and res.skipped == ["old"]
    assert set(res.failed) == {"bad", "boom"} and res.exit_code == 1
    assert "no tissue" in res.warnings["empty"]
    assert res.failed["boom"] == "ValueError: unexpected"
    rows = list(csv.DictReader(open(tmp_path / "failures.csv")))
    assert sorted(r["slide_id"] for r in rows) == ["bad", "boom"]
    bad = next(r for r in rows if r["slide_id"] == "bad")
    assert "truncated" in bad["reason"] and bad["stage"] == "tile"
    record_failure(tmp_path, "extract", "c", None, "x")
    assert len(list(csv.DictReader(open(tmp_path / "failures.csv")))) == 3
    if processes == 1:
        assert res.done == ["a", "empty"]  # in order; with processes, in order of completion


def test_a_dead_worker_process_fails_its_slides_not_the_batch(tmp_path):
    items = ["die", "a", "b", "c", "d"]
    res = run_per_slide(
        "tile", items, dies_on_die, tmp_path, slide_id=str, progress=False, processes=2
    )
    assert "worker process died" in res.failed["die"] and res.exit_code == 1
    # at most one slide per process is in flight, so at most one other slide (running in
    # the other process when the death is seen) fails with it; the rest run in a new pool
    assert len(res.failed) <= 2 and len(res.done) >= 3
    assert sorted(res.done + list(res.failed)) == sorted(items)
    rows = list(csv.DictReader(open(tmp_path / "failures.csv")))
    assert sorted(r["slide_id"] for r in rows) == sorted(res.failed)


def test_interrupt_stops_worker_processes_at_once(tmp_path):
    """SIGINT to the parent alone: it ends the slides in progress instead of waiting for them."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from batch_helpers import sleeps\n"
        "from wsi_mil.batch import run_per_slide\n"
        "if __name__ == '__main__':\n"
        "    print('started', flush=True)\n"
        "    run_per_slide('tile', ['20'] * 4, sleeps, sys.argv[2], slide_id=str,\n"
        "                  progress=False, processes=2)\n"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "interrupt.py"
    script.write_text(code)
    p = subprocess.Popen(
        [sys.executable, str(script), tests_dir, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "started"
    time.sleep(3)  # the workers are sleeping their 20 s
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=15)
    assert time.monotonic() - t0 < 10 and p.returncode != 0


def test_available_cpus_respects_slurm_and_affinity():
    code = "from wsi_mil.batch import available_cpus; print(available_cpus())"
    env = {**os.environ, "SLURM_CPUS_PER_TASK": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1"
    code2 = "import os; os.sched_setaffinity(0, {0}); " + code
    env.pop("SLURM_CPUS_PER_TASK")
    out = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1"
    assert available_cpus() >= 1


def test_output_lock_in_a_shared_locks_folder_survives_its_removal(tmp_path):
    """Holders in one .locks folder (heatmap's) remove it when it empties on release; a
    process creating it at that moment must retry, not fail the slide (FileExistsError
    from mkdir's exist_ok check, seen on a 'make demo' rerun with --processes 2)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from wsi_mil.batch import output_lock\n"
        "d = Path(sys.argv[1]) / '.locks'\n"
        "for i in range(1500):\n"
        "    with output_lock(d / f'{sys.argv[2]}-{i}.png') as held:\n"
        "        assert held\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(k)], stderr=subprocess.PIPE, text=True
        )
        for k in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert not (tmp_path / ".locks").exists()
