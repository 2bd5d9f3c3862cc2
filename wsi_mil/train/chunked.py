"""Streamed, chunked backpropagation through a patch encoder for bags of any size (pure torch).

The bag loss depends on the patch pixels only through the (N, D) patch features, so one
training step on a bag of N patches runs in two passes over the pixels:

1. encode the bag chunk by chunk under ``torch.no_grad`` and keep only the (N, D) features;
2. build the head graph on a leaf copy of the features, compute the loss and backpropagate it
   into the head parameters and ``features.grad`` (N, D);
3. re-read and re-encode each chunk *with* autograd and call
   ``chunk_features.backward(features.grad[chunk])``: the encoder gradients accumulate to
   exactly what full-bag backprop gives (up to floating-point summation order). The last
   chunk keeps its pass-1 graph instead (no re-encoding), which saves one chunk of work.

Memory: one chunk of encoder activations + the head graph over N x D features; pixels are
streamed from ``read_chunk`` twice and never all held. Requirements for exactness, handled
here: random augmentation and dropout in the encoder replay identically in both passes (each
chunk runs under its own seeded RNG, :func:`replay_rng`), and normalisation layers must not
depend on the chunk (BatchNorm in eval mode, :func:`freeze_batchnorm`, or GroupNorm).
A bag that fits in one chunk takes the plain single-pass path (no re-encoding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ReadChunk = Callable[[int, int], Any]  # (start, stop) -> patches [start, stop) of the bag
Prepare = Callable[[Any], torch.Tensor]  # raw chunk -> (n, 3, P, P) float encoder input
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]  # (head output, label) -> 0-d loss

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class BagStepResult:
    """Outcome of one bag: ``loss`` (unscaled), ``prob`` = sigmoid(logit), ``attention`` (N,) on CPU."""

    loss: float
    logit: float
    prob: float
    attention: torch.Tensor | None
    n_patches: int


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(n) in consecutive chunks of ``chunk_size`` (last shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def chunk_seed(seed: int, chunk_index: int) -> int:
    """Seed of chunk ``chunk_index`` under step seed ``seed`` (a 63-bit mix, stable across runs)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(chunk_index) * 0xBF58476D1CE4E5B9 + 1) % (1 << 64)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) % (1 << 64)
    return int(x ^ (x >> 29)) & ((1 << 63) - 1)


@contextlib.contextmanager
def replay_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block under torch's global RNG seeded with ``seed``, restoring the outer state after.

    Everything random inside (augmentation drawn from the global RNG, dropout) is then a pure
    function of ``seed``: running the block twice replays it exactly. CUDA RNG is forked and
    seeded too when ``device`` is a CUDA device.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.manual_seed(int(seed))
        yield


def freeze_batchnorm(module: nn.Module) -> int:
    """Put every BatchNorm layer of ``module`` in eval mode (running statistics, no updates).

    Call after ``module.train()``. Returns the number of layers frozen. Their affine weights
    still train; only the batch statistics are replaced by the running averages, so a chunk
    gives the same output in both passes and in evaluation.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, _BN_TYPES):
            m.eval()
            n += 1
    return n


def has_train_mode_batchnorm(module: nn.Module) -> bool:
    """True if some BatchNorm layer would use per-chunk batch statistics (breaks exactness)."""
    return any(isinstance(m, _BN_TYPES) and m.training for m in module.modules())


def _autocast(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _encode_chunk(
    encoder: nn.Module,
    raw: Any,
    prepare: Prepare | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> torch.Tensor:
    x = prepare(raw) if prepare is not None else raw
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, amp_dtype):
        f = encoder(x)
    return f


def encode_bag(
    encoder: nn.Module,
    read_chunk: ReadChunk,
    n_patches: int,
    chunk_size: int,
    prepare: Prepare | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    out_dtype: torch.dtype | None = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(N, D) features of a bag, encoded chunk by chunk without autograd (pass 1).

    ``seed``: chunk i runs under :func:`replay_rng` (``chunk_seed(seed, i)``), so pass 2 can
    replay its augmentation and dropout; None: the ambient RNG (evaluation). ``out_dtype``:
    dtype of the returned features (None: as the encoder produced them).
    """
    device = torch.device(device)
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        for i, (s, e) in enumerate(chunk_bounds(n_patches, chunk_size)):
            ctx = (
                replay_rng(chunk_seed(seed, i), device)
                if seed is not None
                else contextlib.nullcontext()
            )
            with ctx:
                f = _encode_chunk(
                    encoder, read_chunk(s, e), prepare, device, amp_dtype, channels_last
                )
            parts.append(f if out_dtype is None else f.to(out_dtype))
            if progress is not None:
                progress(e - s)
    if not parts:
        raise ValueError("cannot encode an empty bag (0 patches)")
    return torch.cat(parts, 0)


def bce_loss(out: Any, label: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on ``out.logit`` (0-d) against ``label`` (0-d float 0/1)."""
    logit = out.logit if hasattr(out, "logit") else out
    return nn.functional.binary_cross_entropy_with_logits(
        logit.reshape(()), label.reshape(()).to(logit.dtype)
    )


def chunked_bag_step(
    encoder: nn.Module,
    head: Callable[[torch.Tensor, torch.Tensor | None], Any],
    read_chunk: ReadChunk,
    n_patches: int,
    chunk_size: int,
    norm_coords: torch.Tensor | None,
    label: float | torch.Tensor,
    loss_fn: LossFn = bce_loss,
    prepare: Prepare | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    train_encoder: bool = True,
    loss_scale: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> BagStepResult:
    """One bag's forward + backward through encoder and head; gradients ACCUMULATE into ``.grad``.

    ``read_chunk(start, stop)``: the bag's patches [start, stop) (called twice per chunk when
    the bag spans several chunks); ``prepare``: raw chunk -> encoder input (augmentation drawn
    from torch's global RNG is replayed). ``head(features (N, D), norm_coords (N, 2) | None)``
    returns an object with ``.logit`` (0-d) and optionally ``.attention`` (N,). The loss is
    multiplied by ``loss_scale`` before backward (e.g. 1 / bags per optimiser step); the
    returned ``loss`` is unscaled. ``train_encoder=False`` (frozen encoder) skips pass 2.
    The caller sets the train/eval modes (see :func:`freeze_batchnorm`); zeroes no gradients.
    """
    device = torch.device(device)
    if n_patches < 1:
        raise ValueError("cannot train on an empty bag (0 patches)")
    if train_encoder and has_train_mode_batchnorm(encoder):
        raise ValueError(
            "encoder has BatchNorm layers in training mode: chunks would see different batch "
            "statistics in the two passes; call freeze_batchnorm(encoder) or use GroupNorm"
        )
    y = torch.as_tensor(label, dtype=torch.float32, device=device)
    bounds = chunk_bounds(n_patches, chunk_size)
    head_seed = chunk_seed(seed, -1)

    def run_head(feats: torch.Tensor) -> tuple[Any, torch.Tensor]:
        coords = norm_coords.to(device=device) if norm_coords is not None else None
        if coords is not None and coords.dtype.is_floating_point and coords.dtype != feats.dtype:
            coords = coords.to(feats.dtype)
        with replay_rng(head_seed, device):  # head dropout: a function of the step seed too
            out = head(feats, coords)
        loss = loss_fn(out, y.to(feats.dtype) if feats.dtype.is_floating_point else y)
        return out, loss

    if len(bounds) == 1 and train_encoder:
        # the whole bag is one chunk: plain backprop, no re-encoding needed
        with replay_rng(chunk_seed(seed, 0), device):
            f = _encode_chunk(
                encoder, read_chunk(0, n_patches), prepare, device, amp_dtype, channels_last
            )
        feats = f if amp_dtype is None else f.float()
        out, loss = run_head(feats)
        (loss * loss_scale).backward()
        if progress is not None:
            progress(n_patches)
        return _result(out, loss, n_patches)

    if not train_encoder:
        with torch.no_grad():
            feats = encode_bag(
                encoder, read_chunk, n_patches, chunk_size, prepare, None, device, amp_dtype,
                channels_last, out_dtype=None if amp_dtype is None else torch.float32,
            )  # fmt: skip
        out, loss = run_head(feats)
        (loss * loss_scale).backward()
        if progress is not None:
            progress(n_patches)
        return _result(out, loss, n_patches)

    # pass 1: features only, except the LAST chunk, whose graph is kept (one chunk of
    # activations, the same bound as pass 2) so that pass 2 need not re-encode it
    *head_bounds, (ls, le) = bounds
    with torch.no_grad():
        first = encode_bag(
            encoder, read_chunk, ls, chunk_size, prepare, seed, device, amp_dtype,
            channels_last, out_dtype=None if amp_dtype is None else torch.float32,
        )  # fmt: skip
    with replay_rng(chunk_seed(seed, len(head_bounds)), device):
        f_last = _encode_chunk(
            encoder, read_chunk(ls, le), prepare, device, amp_dtype, channels_last
        )
    feats = torch.cat([first, f_last.detach().to(first.dtype)], 0).requires_grad_(True)
    out, loss = run_head(feats)
    (loss * loss_scale).backward()
    if progress is not None:
        progress(n_patches)

    # pass 2: push each chunk's slice of dL/dfeatures into the encoder; re-encode (with
    # autograd, same RNG seed) every chunk but the last
    grad = feats.grad
    assert grad is not None
    f_last.backward(grad[ls:le].to(f_last.dtype))
    del f_last
    if progress is not None:
        progress(le - ls)
    for i, (s, e) in enumerate(head_bounds):
        with replay_rng(chunk_seed(seed, i), device):
            f = _encode_chunk(encoder, read_chunk(s, e), prepare, device, amp_dtype, channels_last)
        f.backward(grad[s:e].to(f.dtype))
        if progress is not None:
            progress(e - s)
    return _result(out, loss, n_patches)


def _result(out: Any, loss: torch.Tensor, n: int) -> BagStepResult:
    logit = out.logit if hasattr(out, "logit") else out
    att = getattr(out, "attention", None)
    lg = float(logit.detach().float().reshape(()))
    return BagStepResult(
        loss=float(loss.detach()),
        logit=lg,
        prob=float(torch.sigmoid(torch.tensor(lg))),
        attention=att.detach().float().cpu() if isinstance(att, torch.Tensor) else None,
        n_patches=n,
    )


def full_bag_step(
    encoder: nn.Module,
    head: Callable[[torch.Tensor, torch.Tensor | None], Any],
    read_chunk: ReadChunk,
    n_patches: int,
    chunk_size: int,
    norm_coords: torch.Tensor | None,
    label: float | torch.Tensor,
    loss_fn: LossFn = bce_loss,
    prepare: Prepare | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> BagStepResult:
    """Naive reference: the whole bag in ONE autograd graph (every activation of every patch kept).

    Memory grows with N. The encoder still runs chunk by chunk (same seeds as
    :func:`chunked_bag_step`, so augmentation and dropout draw the same numbers), but nothing
    is recomputed: a single ``loss.backward()`` through head and all encoder activations.
    For tests and benchmarks.
    """
    device = torch.device(device)
    parts = []
    for i, (s, e) in enumerate(chunk_bounds(n_patches, chunk_size)):
        with replay_rng(chunk_seed(seed, i), device):
            parts.append(
                _encode_chunk(encoder, read_chunk(s, e), prepare, device, amp_dtype, channels_last)
            )
    feats = torch.cat(parts, 0)
    if amp_dtype is not None:
        feats = feats.float()
    coords = None if norm_coords is None else norm_coords.to(device=device, dtype=feats.dtype)
    with replay_rng(chunk_seed(seed, -1), device):
        out = head(feats, coords)
    loss = loss_fn(out, torch.as_tensor(label, dtype=feats.dtype, device=device))
    loss.backward()
    return _result(out, loss, n_patches)
