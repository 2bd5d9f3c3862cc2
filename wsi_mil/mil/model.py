"""Positional-attention MIL head (the seed's model on top of patch features).

One bag = all patches of a slide: ``features`` (N, D) and normalised coordinates
(N, 2) in [0, 1]. Features are first standardised per dimension with a fixed mean and std
measured on the training bags (``feature_norm="standard"``, stored in the checkpoint as
buffers; ``"none"`` feeds them raw as the seed did). Encoder features often share a large
common offset that saturates the tanh attention of a freshly initialised head, so without
this the head can fail to learn from perfectly good features. Per patch, a learned positional encoding (MLP 2 -> P -> P) is
concatenated to the features, h = [f, pos(xy)] of width D' = D + P. Attention
``a = softmax_N(w2 . tanh(W1 h))`` (optionally gated), the bag vector ``z = sum a_i h_i``,
and the classifier ``Linear(D', 64) -> ReLU -> Linear(64, 1)`` gives one logit
(sigmoid for the probability). Memory is O(N * D'): nothing is quadratic in N.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from wsi_mil.config import ModelConfig
from wsi_mil.errors import ConfigError, DataError


@dataclass
class MILOutput:
    """``logit``: 0-d tensor; ``attention``: (N,) tensor, non-negative, sums to 1."""

    logit: torch.Tensor
    attention: torch.Tensor

    @property
    def prob(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)


FEATURE_NORMS = ("standard", "none")


class PositionalAttentionMIL(nn.Module):
    """The seed's MIL head. ``forward(features (N, D), norm_coords (N, 2) | None) -> MILOutput``."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        if cfg.in_dim < 1 or cfg.attn_dim < 1 or cfg.hidden_dim < 1 or cfg.pos_dim < 0:
            raise ConfigError(f"bad model sizes {asdict(cfg)}", "dims must be positive")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ConfigError(f"--dropout {cfg.dropout} is outside [0, 1)")
        if cfg.feature_norm not in FEATURE_NORMS:
            raise ConfigError(
                f"--feature-norm {cfg.feature_norm!r} is not supported",
                f"choose one of: {', '.join(FEATURE_NORMS)}",
            )
        self.cfg = cfg
        # identity until set_feature_stats(); saved with the weights, so predict reuses them
        self.register_buffer("feature_mean", torch.zeros(cfg.in_dim))
        self.register_buffer("feature_std", torch.ones(cfg.in_dim))
        self.use_pos = bool(cfg.use_pos and cfg.pos_dim > 0)
        pos_dim = cfg.pos_dim if self.use_pos else 0
        d = cfg.in_dim + pos_dim
        self.pos_encoder = (
            nn.Sequential(nn.Linear(2, pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
            if self.use_pos
            else None
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.attention_v = nn.Linear(d, cfg.attn_dim)  # tanh branch (the seed's)
        self.attention_u = nn.Linear(d, cfg.attn_dim) if cfg.gated else None  # sigmoid gate
        self.attention_w = nn.Linear(cfg.attn_dim, 1)
        self.classifier = nn.Sequential(
            nn.Linear(d, cfg.hidden_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, 1),
        )

    @property
    def in_dim(self) -> int:
        return self.cfg.in_dim

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the per-dimension standardisation: (D,) mean and std of training features."""
        if mean.shape != (self.cfg.in_dim,) or std.shape != (self.cfg.in_dim,):
            raise ValueError(f"feature stats must have shape ({self.cfg.in_dim},)")
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_std.copy_(std.to(self.feature_std).clamp_min(1e-6))

    def embed(self, features: torch.Tensor, norm_coords: torch.Tensor | None) -> torch.Tensor:
        """(N, D) features [+ (N, 2) coords] -> (N, D') patch embeddings."""
        if features.ndim != 2 or features.shape[1] != self.cfg.in_dim:
            raise DataError(
                f"features of shape {tuple(features.shape)}, the model expects (N, {self.cfg.in_dim})",
                "use feature stores made with the encoder this model was trained on",
            )
        if features.shape[0] == 0:
            raise DataError("empty bag (0 patches)", "a slide needs at least one patch")
        if self.cfg.feature_norm == "standard":
            features = (features - self.feature_mean.to(features.dtype)) / self.feature_std.to(
                features.dtype
            )
        if self.pos_encoder is None:
            return self.embed_dropout(features)
        if norm_coords is None:
            raise DataError(
                "this bag has no coordinates but the model uses the positional encoding",
                "give feature stores with coords, or train a model with --no-pos",
            )
        pos = self.pos_encoder(norm_coords.to(features.dtype))
        return self.embed_dropout(torch.cat([features, pos], dim=1))

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D') -> (N,) unnormalised attention scores."""
        a = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            a = a * torch.sigmoid(self.attention_u(h))
        return self.attention_w(a).squeeze(-1)

    def forward(self, features: torch.Tensor, norm_coords: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(features, norm_coords)
        attention = torch.softmax(self.attention_logits(h), dim=0)  # (N,)
        z = attention @ h  # (D',) weighted sum, no (N, D') temporary beyond h
        logit = self.classifier(z).squeeze(-1)
        return MILOutput(logit=logit, attention=attention)


def feature_stats(bags: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over all patches of ``bags`` ((N_i, D) tensors), in float64."""
    n, s1, s2 = 0, None, None
    for f in bags:
        f = f.detach().to(torch.float64)
        s1 = f.sum(0) if s1 is None else s1 + f.sum(0)
        s2 = (f * f).sum(0) if s2 is None else s2 + (f * f).sum(0)
        n += f.shape[0]
    if n == 0 or s1 is None or s2 is None:
        raise DataError("no training patches to compute feature statistics from")
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0.0) * (n / max(1, n - 1))
    return mean.float(), var.sqrt().float()


def model_from_checkpoint(ckpt: dict[str, Any]) -> PositionalAttentionMIL:
    """Rebuild the head from a checkpoint dict (``model_config`` + ``model`` state dict)."""
    mc = ckpt.get("model_config")
    if not isinstance(mc, dict) or "model" not in ckpt:
        raise ConfigError(
            "checkpoint has no 'model_config'/'model'",
            "pass a checkpoint written by 'wsi-mil train'",
        )
    mc = {"feature_norm": "none", **mc}  # checkpoints from before feature_norm fed raw features
    cfg = ModelConfig(**{k: v for k, v in mc.items() if k in ModelConfig.__dataclass_fields__})
    model = PositionalAttentionMIL(cfg)
    state = dict(ckpt["model"])
    for k in ("feature_mean", "feature_std"):  # absent in checkpoints from before feature_norm
        state.setdefault(k, getattr(model, k))
    model.load_state_dict(state)
    return model
