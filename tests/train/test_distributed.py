"""wsi_mil.train.distributed: single-process no-ops and a real 2-rank gloo group via torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.train.distributed import (
    DistInfo,
    allgather_objects,
    allreduce_gradients,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    is_main,
    rank_slice,
    shard_for_rank,
)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for v in TORCHRUN_ENV:
        monkeypatch.delenv(v, raising=False)


def test_single_process_info(no_torchrun_env):
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"))
    assert is_main(info) and not info.distributed
    auto = init_distributed("auto")
    assert auto.world_size == 1
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_world_size_one_under_torchrun_is_single_process(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    info = init_distributed("cpu")
    assert info.world_size == 1 and info.rank == 0
    assert not torch.distributed.is_initialized()


def test_bad_env_and_device_are_config_errors(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="outside"):
        init_distributed("cpu")
    for v in TORCHRUN_ENV:
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ConfigError, match="device"):
        init_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            init_distributed("cuda")


def test_shard_for_rank_round_robin_disjoint_covering():
    items = list(range(11))
    parts = [shard_for_rank(items, DistInfo(r, 3, r)) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(x for p in parts for x in p) == items
    assert shard_for_rank(items, DistInfo()) == items


def test_rank_slice_partial_group():
    group = ["a", "b", "c"]  # last, partial group of G = 2 * 2
    assert rank_slice(group, DistInfo(0, 2, 0), 2) == ["a", "b"]
    assert rank_slice(group, DistInfo(1, 2, 1), 2) == ["c"]
    assert rank_slice(group, DistInfo(2, 3, 2), 2) == []


def test_single_process_collectives_are_noops(no_torchrun_env):
    info = init_distributed("cpu")
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2))  # no grad: must stay None
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    allreduce_gradients([p, q], info)
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0])) and q.grad is None
    assert allgather_objects({"a": 1}, info) == [{"a": 1}]
    assert broadcast_object([1, 2], info) == [1, 2]
    barrier(info)
    cleanup(info)


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from wsi_mil.train.distributed import (
        allgather_objects, allreduce_gradients, barrier, broadcast_object, cleanup,
        init_distributed, is_main,
    )

    info = init_distributed("cpu")
    assert torch.distributed.get_backend() == "gloo"
    r = info.rank
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    only0 = torch.nn.Parameter(torch.zeros(2))   # grad on rank 0 only
    none = torch.nn.Parameter(torch.zeros(2))    # grad on no rank
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    a.grad = torch.full((2, 3), float(r + 1))
    b.grad = torch.arange(4, dtype=torch.float64) * (10 ** r)
    if r == 0:
        only0.grad = torch.tensor([5.0, 6.0])
    allreduce_gradients([a, b, only0, none, frozen], info)
    gathered = allgather_objects({"rank": r, "n": [r] * (r + 1)}, info)
    token = broadcast_object("from-zero" if r == 0 else None, info)
    barrier(info)
    out = {
        "rank": r, "world": info.world_size, "main": is_main(info),
        "a": a.grad.tolist(), "b": b.grad.tolist(), "b_dtype": str(b.grad.dtype),
        "only0": only0.grad.tolist(), "none": none.grad is None, "frozen": frozen.grad is None,
        "gathered": gathered, "token": token,
    }
    with open(sys.argv[1] + f"/rank{r}.json", "w") as fh:
        json.dump(out, fh)
    cleanup(info)
    """
)


def torchrun(nproc: int, *args: str, cwd: Path | None = None, timeout: float = 300):
    """``python -m torch.distributed.run --standalone --nproc-per-node N ARGS`` (real torchrun)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_rank_gloo_collectives(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    res = torchrun(2, str(script), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for o in outs:
        assert o["world"] == 2
        assert o["a"] == [[3.0] * 3] * 2  # 1 + 2
        assert o["b"] == [0.0, 11.0, 22.0, 33.0] and o["b_dtype"] == "torch.float64"
        assert o["only0"] == [5.0, 6.0]  # rank 1 contributed a materialised zero
        assert o["none"] is True and o["frozen"] is True
        assert o["gathered"] == [{"rank": 0, "n": [0]}, {"rank": 1, "n": [1, 1]}]
        assert o["token"] == "from-zero"
    assert [o["main"] for o in outs] == [True, False]
