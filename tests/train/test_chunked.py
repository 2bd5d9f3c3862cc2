"""Chunked (two-pass) backprop equals plain full-bag backprop, parameter by parameter (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsi_mil.features.resnet import ResNetPatchCNN
from wsi_mil.train.chunked import (
    chunk_bounds,
    chunked_bag_step,
    encode_bag,
    freeze_batchnorm,
    full_bag_step,
)

N, P, D = 10, 32, 8


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyHead(nn.Module):
    """Attention MIL head with a coordinate embedding and dropout (randomness to replay)."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.pos = nn.Linear(2, 4)
        self.att = nn.Sequential(nn.Linear(d + 4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 1))
        self.cls = nn.Linear(d + 4, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None):
        h = torch.cat([x, self.pos(c)], 1)
        a = torch.softmax(self.att(h).squeeze(1), 0)

        class Out:
            logit = self.cls((a[:, None] * h).sum(0)).squeeze()
            attention = a

        return Out()


def make_encoder(norm: str, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(1)
    cnn = ResNetPatchCNN(
        feature_dim=D,
        norm="groupnorm" if norm == "groupnorm" else "bn",
        widths=(4, 8, 8),
        blocks_per_stage=1,
    )
    enc = nn.Sequential(cnn, nn.Dropout(dropout)).double()
    for m in enc.modules():  # non-trivial running statistics and affine weights for frozen BN
        if isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    enc.train()
    freeze_batchnorm(enc)
    return enc


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random per-patch flip + brightness from torch's global RNG (must replay in pass 2)."""
    flip = torch.rand(x.shape[0], dtype=x.dtype) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x * (1 + 0.2 * torch.randn(x.shape[0], 1, 1, 1, dtype=x.dtype))


class Reader:
    """Bag pixels served chunk by chunk; records every read."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 3, P, P, generator=g, dtype=torch.float64)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, s: int, e: int) -> torch.Tensor:
        self.calls.append((s, e))
        return self.x[s:e]


def grads(*mods: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, m in enumerate(mods):
        for name, p in m.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, f"no gradient for {name}"
                out[f"{k}.{name}"] = p.grad.detach().clone()
                p.grad = None
    return out


def run_pair(norm: str, chunk: int, seed: int = 3, prepare=augment, n: int = N):
    enc = make_encoder(norm)
    torch.manual_seed(2)
    head = TinyHead().double().train()
    coords = torch.rand(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    reader = Reader(n)
    res_c = chunked_bag_step(enc, head, reader, n, chunk, coords, 1.0, prepare=prepare, seed=seed)
    g_chunked = grads(enc, head)
    calls = list(reader.calls)
    res_f = full_bag_step(enc, head, Reader(n), n, chunk, coords, 1.0, prepare=prepare, seed=seed)
    g_full = grads(enc, head)
    return res_c, res_f, g_chunked, g_full, calls


@pytest.mark.parametrize("norm", ["frozen-bn", "groupnorm"])
@pytest.mark.parametrize("chunk", [1, 3, 4, N, N + 5])
def test_chunked_gradients_equal_full_bag(norm: str, chunk: int) -> None:
    res_c, res_f, g_c, g_f, calls = run_pair(norm, chunk)
    assert res_c.loss == pytest.approx(res_f.loss, rel=1e-12)
    assert set(g_c) == set(g_f) and len(g_c) > 10
    for name in g_f:
        assert torch.count_nonzero(g_f[name]) > 0, f"{name}: zero gradient, test would be vacuous"
        torch.testing.assert_close(g_c[name], g_f[name], rtol=1e-9, atol=1e-13, msg=name)
    assert max(e - s for s, e in calls) <= chunk
    if chunk < N:  # two streamed passes over the pixels, chunk by chunk (last chunk: once)
        bounds = chunk_bounds(N, chunk)
        assert calls == bounds + bounds[:-1]
    else:  # one chunk: a single pass
        assert calls == [(0, N)]


def test_replay_matters() -> None:
    """Different step seeds draw different augmentation/dropout, so the test above is not vacuous."""
    _, _, g1, _, _ = run_pair("groupnorm", 3, seed=3)
    _, _, g2, _, _ = run_pair("groupnorm", 3, seed=4)
    assert any(not torch.allclose(g1[k], g2[k]) for k in g1)


def test_without_replay_gradients_differ() -> None:
    """Sanity check of the reference: augmentation that ignores the replayed RNG breaks equality."""
    gen = torch.Generator().manual_seed(0)

    def unreplayed(x: torch.Tensor) -> torch.Tensor:
        return x * (1 + 0.2 * torch.randn(x.shape[0], 1, 1, 1, dtype=x.dtype, generator=gen))

    _, _, g_c, g_f, _ = run_pair("groupnorm", 3, prepare=unreplayed)
    assert any(not torch.allclose(g_c[k], g_f[k], rtol=1e-6) for k in g_f)


def test_deterministic_on_cpu() -> None:
    _, _, g1, _, _ = run_pair("frozen-bn", 4)
    _, _, g2, _, _ = run_pair("frozen-bn", 4)
    for k in g1:
        assert torch.equal(g1[k], g2[k])


def test_train_mode_batchnorm_is_refused() -> None:
    enc = make_encoder("frozen-bn")
    enc.train()  # BN back in training mode: per-chunk batch statistics
    head = TinyHead().double()
    with pytest.raises(ValueError, match="freeze_batchnorm"):
        chunked_bag_step(enc, head, Reader(), N, 4, torch.zeros(N, 2, dtype=torch.float64), 0.0)


def test_frozen_encoder_trains_head_only_and_scales_loss() -> None:
    enc = make_encoder("groupnorm").eval()
    torch.manual_seed(2)
    head = TinyHead().double()
    coords = torch.rand(N, 2, dtype=torch.float64)
    reader = Reader()
    chunked_bag_step(
        enc, head, reader, N, 4, coords, 0.0, seed=1, train_encoder=False, loss_scale=0.5
    )
    assert all(p.grad is None for p in enc.parameters())
    assert reader.calls == chunk_bounds(N, 4)  # one pass only
    g_half = grads(head)
    chunked_bag_step(enc, head, Reader(), N, 4, coords, 0.0, seed=1, train_encoder=False)
    g_one = grads(head)
    for k in g_one:
        torch.testing.assert_close(g_half[k] * 2, g_one[k], rtol=1e-12, atol=0)


def test_gradients_accumulate_over_bags() -> None:
    """Two bags stepped back to back accumulate like the sum of their separate gradients."""
    enc = make_encoder("groupnorm")
    head = TinyHead().double()
    coords = torch.rand(N, 2, dtype=torch.float64)
    chunked_bag_step(enc, head, Reader(), N, 3, coords, 1.0, seed=1)
    a = grads(enc, head)
    chunked_bag_step(enc, head, Reader(), N, 3, coords, 0.0, seed=2)
    b = grads(enc, head)
    chunked_bag_step(enc, head, Reader(), N, 3, coords, 1.0, seed=1)
    chunked_bag_step(enc, head, Reader(), N, 3, coords, 0.0, seed=2)
    ab = grads(enc, head)
    for k in ab:
        torch.testing.assert_close(ab[k], a[k] + b[k], rtol=1e-10, atol=1e-14)


def test_encode_bag_matches_one_shot_in_eval() -> None:
    enc = make_encoder("frozen-bn").eval()
    r = Reader(13)
    with torch.no_grad():
        ref = enc(r.x)
    got = encode_bag(enc, r, 13, 5, out_dtype=None)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="empty"):
        encode_bag(enc, r, 0, 5)


@pytest.mark.gpu
def test_cuda_bf16_channels_last_matches_full_bag() -> None:
    """On CUDA (bf16 autocast, channels_last) chunked and full-bag gradients agree to bf16 precision."""
    dev = torch.device("cuda")
    enc = make_encoder("groupnorm").float().to(dev).to(memory_format=torch.channels_last)
    torch.manual_seed(2)
    head = TinyHead().to(dev)
    x = Reader(40).x.float()
    coords = torch.rand(40, 2)
    kw = dict(prepare=augment, seed=3, device=dev, amp_dtype=torch.bfloat16, channels_last=True)
    chunked_bag_step(enc, head, lambda s, e: x[s:e], 40, 16, coords, 1.0, **kw)
    g_c = grads(enc, head)
    full_bag_step(enc, head, lambda s, e: x[s:e], 40, 16, coords, 1.0, **kw)
    g_f = grads(enc, head)
    for k in g_f:
        err = (g_c[k] - g_f[k]).norm() / g_f[k].norm().clamp_min(1e-12)
        assert err < 2e-2, f"{k}: relative error {err:.3g}"
