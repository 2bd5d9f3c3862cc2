"""Multi-process training helpers on top of ``torch.distributed`` (launched by ``torchrun``).

The training loops call these and nothing else from ``torch.distributed``, so the same
code runs as one process (every helper is then a no-op) or as N ranks::

    info = init_distributed(cfg.device)        # reads RANK / WORLD_SIZE / LOCAL_RANK
    mine = shard_for_rank(val_bags, info)       # round robin
    ...; loss.backward(); allreduce_gradients(model.parameters(), info); opt.step()
    preds = [p for part in allgather_objects(my_preds, info) for p in part]
    if is_main(info): write files
    cleanup(info)

Backend: ``gloo`` on CPU, ``nccl`` on CUDA (each rank pinned to ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from wsi_mil.errors import ConfigError

T = TypeVar("T")

_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, GPU ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part (collectives are real)."""
        return self.world_size > 1


def _resolve_device(device: str, local_rank: int) -> torch.device:
    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} was asked for but no CUDA device is visible",
                "use --device cpu or auto, or run on a GPU node",
            )
        if name == "cuda":
            n = torch.cuda.device_count()
            if local_rank >= n:
                raise ConfigError(
                    f"local rank {local_rank} has no GPU: only {n} visible",
                    "use torchrun --nproc-per-node <= the number of GPUs on the node",
                )
            return torch.device("cuda", local_rank)
        return torch.device(name)
    if name in ("cpu", "mps"):
        return torch.device(name)
    raise ConfigError(f"unknown device {device!r}", "use auto, cpu or cuda")


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not an integer",
            "launch with torchrun, which sets RANK/WORLD_SIZE/LOCAL_RANK",
        ) from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group ``torchrun`` set up, or return a single-process :class:`DistInfo`.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through
    ``init_method="env://"``). ``device``: ``auto`` | ``cpu`` | ``cuda``. Calling it again once
    the group exists returns the same information.
    """
    if not all(v in os.environ for v in _ENV_VARS) or _env_int("WORLD_SIZE") <= 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        dev = _resolve_device(device, local_rank if "LOCAL_RANK" in os.environ else 0)
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, 0, dev)

    rank, world, local_rank = (_env_int(v) for v in _ENV_VARS)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}", "launch with torchrun")
    for v in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(v):
            raise ConfigError(
                f"WORLD_SIZE={world} but {v} is not set",
                "launch with torchrun (it sets MASTER_ADDR/MASTER_PORT), or set them yourself",
            )
    dev = _resolve_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kw: dict[str, Any] = {}
        if backend == "nccl":
            kw["device_id"] = dev  # binds the communicator to this GPU eagerly
        try:
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=rank,
                world_size=world,
                timeout=_dt.timedelta(minutes=30),
                **kw,
            )
        except TypeError:  # older torch without device_id
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    if rank != 0:  # progress and info lines once (rank 0's); warnings and errors from all
        quiet = logging.getLogger("wsi_mil")
        quiet.setLevel(max(quiet.getEffectiveLevel(), logging.WARNING))
    return DistInfo(rank, world, local_rank, dev)


def is_main(info: DistInfo) -> bool:
    """True on rank 0: the only rank that writes checkpoints, metrics and logs."""
    return info.rank == 0


def shard_for_rank(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's items, round robin (``items[rank::world_size]``); order is kept."""
    return list(items[info.rank :: info.world_size])


def rank_slice(group: Sequence[T], info: DistInfo, bags_per_step: int) -> list[T]:
    """This rank's part of one optimizer-step group: ``group[rank*B:(rank+1)*B]`` (may be empty)."""
    b = int(bags_per_step)
    return list(group[info.rank * b : (info.rank + 1) * b])


def _active(info: DistInfo) -> bool:
    return info.world_size > 1 and dist.is_available() and dist.is_initialized()


def allreduce_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """SUM every parameter's ``.grad`` across ranks, in place. No-op for one process.

    A parameter whose grad is ``None`` on some ranks but not on others gets a zero grad
    first (that rank saw no bag touching it), so every rank ends with identical grads. A
    parameter with no grad on *any* rank stays ``None``, exactly as in one process that
    accumulated over the same bags (the optimizer then skips it everywhere).
    """
    if not _active(info):
        return
    ps = [p for p in params if p.requires_grad]
    if not ps:
        return
    comm_dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    has = torch.tensor([p.grad is not None for p in ps], dtype=torch.int32, device=comm_dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(ps, has.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # one flat all-reduce per (device, dtype) bucket instead of one per tensor
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in live:
        g = p.grad
        assert g is not None
        if g.is_sparse:
            g = g.to_dense()
            p.grad = g
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n


def allgather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Picklable ``obj`` from every rank, as a list indexed by rank (``[obj]`` for one process)."""
    if not _active(info):
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """``obj`` as given on rank ``src``, returned on every rank."""
    if not _active(info):
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if not _active(info):
        return
    if info.device.type == "cuda":
        dist.barrier(device_ids=[info.device.index or 0])
    else:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (safe to call twice, or for one process)."""
    if info.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
