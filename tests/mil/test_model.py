"""PositionalAttentionMIL: attention is a distribution, order invariance, gradients, options."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.config import ModelConfig
from wsi_mil.errors import ConfigError, DataError
from wsi_mil.mil.model import PositionalAttentionMIL, feature_stats, model_from_checkpoint

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


def test_feature_standardisation_makes_the_head_invariant_to_feature_offset_and_scale():
    torch.manual_seed(0)
    m = PositionalAttentionMIL(ModelConfig(in_dim=16)).eval()
    x, xy = _bag()
    train = [torch.randn(50, 16) for _ in range(4)]
    m.set_feature_stats(*feature_stats(train))
    ref = m(x, xy)
    # the same features in other units (offset + per-dim scale), stats measured in those units
    shift, scale = torch.randn(16) * 20, torch.rand(16) * 5 + 0.5
    m2 = PositionalAttentionMIL(ModelConfig(in_dim=16)).eval()
    m2.load_state_dict(m.state_dict())
    m2.set_feature_stats(*feature_stats([t * scale + shift for t in train]))
    out = m2(x * scale + shift, xy)
    torch.testing.assert_close(out.logit, ref.logit, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.attention, ref.attention, atol=1e-5, rtol=1e-4)


def test_feature_stats_are_exact_mean_and_std():
    bags = [torch.randn(n, 8) * 3 + 7 for n in (5, 11, 1)]
    mean, std = feature_stats(bags)
    allf = torch.cat(bags).double()
    torch.testing.assert_close(mean, allf.mean(0).float())
    torch.testing.assert_close(std, allf.std(0).float())


def test_feature_norm_none_is_the_seeds_raw_head_and_old_checkpoints_load():
    torch.manual_seed(0)
    raw = PositionalAttentionMIL(ModelConfig(in_dim=16, feature_norm="none")).eval()
    raw.set_feature_stats(torch.full((16,), 5.0), torch.full((16,), 3.0))  # ignored
    x, xy = _bag()
    std = PositionalAttentionMIL(ModelConfig(in_dim=16)).eval()
    std.load_state_dict({**raw.state_dict(), "feature_mean": torch.zeros(16)})
    std.set_feature_stats(torch.zeros(16), torch.ones(16))
    assert torch.equal(raw(x, xy).logit, std(x, xy).logit)  # identity stats == raw
    # a checkpoint written before feature_norm existed: no key, no buffers -> raw features
    old = {k: v for k, v in raw.state_dict().items() if not k.startswith("feature_")}
    cfg = {k: v for k, v in vars(raw.cfg).items() if k != "feature_norm"}
    m = model_from_checkpoint({"model": old, "model_config": cfg}).eval()
    assert m.cfg.feature_norm == "none"
    assert torch.equal(m(x, xy).logit, raw(x, xy).logit)


def test_unknown_feature_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="feature-norm"):
        PositionalAttentionMIL(ModelConfig(in_dim=4, feature_norm="layer"))
