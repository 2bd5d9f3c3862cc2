"""PositionalAttentionMIL: attention is a distribution, order invariance, gradients, options."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.config import ModelConfig
from wsi_mil.errors import DataError
from wsi_mil.mil.model import PositionalAttentionMIL, model_from_checkpoint

VARIANTS = {
    "seed": ModelConfig(in_dim=16),
    "gated": ModelConfig(in_dim=16, gated=True),
    "no_pos": ModelConfig(in_dim=16, use_pos=False),
    "dropout": ModelConfig(in_dim=16, dropout=0.3),
}


def _bag(n: int = 37, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.rand(n, 2, generator=g)


@pytest.mark.parametrize("name", VARIANTS)
def test_attention_sums_to_one_and_shapes(name):
    torch.manual_seed(0)
    m = PositionalAttentionMIL(VARIANTS[name]).eval()
    x, xy = _bag()
    out = m(x, xy)
    assert out.logit.shape == ()
    assert out.attention.shape == (37,)
    assert (out.attention >= 0).all()
    assert torch.allclose(out.attention.sum(), torch.tensor(1.0), atol=1e-6)
    assert 0.0 < float(out.prob.detach()) < 1.0


@pytest.mark.parametrize("name", VARIANTS)
def test_output_invariant_to_patch_order(name):
    torch.manual_seed(0)
    m = PositionalAttentionMIL(VARIANTS[name]).eval()
    x, xy = _bag(200)
    perm = torch.randperm(200)
    a, b = m(x, xy), m(x[perm], xy[perm])
    assert torch.allclose(a.logit, b.logit, atol=1e-5)
    assert torch.allclose(a.attention[perm], b.attention, atol=1e-7)


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    m = PositionalAttentionMIL(VARIANTS[name]).train()
    x, xy = _bag(50)
    out = m(x, xy)
    torch.nn.functional.binary_cross_entropy_with_logits(out.logit, torch.tensor(1.0)).backward()
    params = dict(m.named_parameters())
    assert params, "model has no parameters"
    for k, p in params.items():
        assert p.grad is not None, f"{k} got no gradient"
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0, f"{k} got an all-zero gradient"


def test_seed_architecture_sizes():
    m = PositionalAttentionMIL(ModelConfig(in_dim=128))
    sizes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert sizes["pos_encoder.0.weight"] == (32, 2)
    assert sizes["pos_encoder.2.weight"] == (32, 32)
    assert sizes["attention_v.weight"] == (64, 160)
    assert sizes["attention_w.weight"] == (1, 64)
    assert sizes["classifier.0.weight"] == (64, 160)
    assert sizes["classifier.3.weight"] == (1, 64)
    assert m.attention_u is None


def test_positional_encoding_is_used():
    torch.manual_seed(0)
    m = PositionalAttentionMIL(ModelConfig(in_dim=16)).eval()
    x, xy = _bag()
    assert not torch.allclose(m(x, xy).attention, m(x, 1 - xy).attention)


def test_no_coords_with_pos_model_is_a_clear_error():
    m = PositionalAttentionMIL(ModelConfig(in_dim=16))
    with pytest.raises(DataError, match="no coordinates.*--no-pos"):
        m(torch.randn(5, 16), None)


def test_no_pos_model_ignores_coords():
    torch.manual_seed(0)
    m = PositionalAttentionMIL(ModelConfig(in_dim=16, use_pos=False)).eval()
    x, xy = _bag()
    assert torch.equal(m(x, None).logit, m(x, xy).logit)
    assert m.pos_encoder is None


def test_wrong_width_and_empty_bag_are_errors():
    m = PositionalAttentionMIL(ModelConfig(in_dim=16))
    with pytest.raises(DataError, match=r"expects \(N, 16\)"):
        m(torch.randn(5, 8), torch.rand(5, 2))
    with pytest.raises(DataError, match="empty bag"):
        m(torch.randn(0, 16), torch.rand(0, 2))


def test_single_patch_bag():
    m = PositionalAttentionMIL(ModelConfig(in_dim=16)).eval()
    out = m(torch.randn(1, 16), torch.rand(1, 2))
    assert float(out.attention[0].detach()) == pytest.approx(1.0)


def test_large_bag_forward_backward():
    """10^5 patches with autograd: memory is O(N * D'), nothing quadratic."""
    torch.manual_seed(0)
    m = PositionalAttentionMIL(ModelConfig(in_dim=128))
    x, xy = torch.randn(100_000, 128), torch.rand(100_000, 2)
    out = m(x, xy)
    out.logit.backward()
    assert out.attention.shape == (100_000,)
    assert m.attention_v.weight.grad is not None


def test_rebuild_from_checkpoint_dict():
    m = PositionalAttentionMIL(ModelConfig(in_dim=16, gated=True))
    ck = {"model": m.state_dict(), "model_config": {**vars(m.cfg)}}
    m2 = model_from_checkpoint(ck).eval()
    x, xy = _bag()
    assert torch.equal(m.eval()(x, xy).logit, m2(x, xy).logit)
