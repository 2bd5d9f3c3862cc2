"""Patch encoder registry (in the style of timm's): ``@register_encoder`` + ``create_encoder``.

Every encoder returned by :func:`create_encoder` is an ``nn.Module`` in eval mode with an
``.info`` :class:`EncoderInfo`: input size, normalisation, output dim, the SHA-256 of its
weights and an *encoder tag* (``resnet-patch-cnn-d128-1a2b3c4d``) that names the feature
folder ``W/features/<tag>/`` and changes whenever the encoder, its kwargs or its weights
change, so caches made by different encoders are never mixed.

Weights: ``weights=PATH`` loads an ``encoder.pt`` (``{"encoder", "kwargs", "state_dict"}``,
written by end-to-end training) or a plain state_dict, always with
``torch.load(weights_only=True)``. Without weights the encoder is randomly initialised from
``seed`` (deterministic); its "weights SHA-256" is then the hash of that initial state_dict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_mil.errors import ConfigError
from wsi_mil.features.resnet import NORMS, ResNetPatchCNN

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_ENCODER = "resnet-patch-cnn"
TIMM_PREFIX = "timm:"


@dataclass
class EncoderInfo:
    """Metadata of a built encoder.

    ``input_px``: side the encoder expects in px (patches are resized to it), or None when
    any size works (fully convolutional). ``mean``/``std``: per-channel RGB normalisation of
    [0, 1] pixels. ``trained``: False for a random initialisation.
    """

    name: str
    input_px: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_dim: int
    weights_sha256: str
    tag: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    trained: bool = False
    weights_path: str | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: ``build(**kwargs) -> nn.Module`` plus its input conventions."""

    name: str
    build: Callable[..., nn.Module]
    input_px: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(
    name: str,
    *,
    input_px: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn(**kwargs) -> nn.Module`` (output (n, D)) under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = EncoderSpec(
            name, fn, input_px, mean, std, description or (fn.__doc__ or "").strip()
        )
        return fn

    return deco


def list_encoders() -> list[str]:
    """Registered names (``timm:<model>`` is accepted in addition when timm is installed)."""
    return sorted(_REGISTRY)


@register_encoder(
    DEFAULT_ENCODER,
    description="the seed's ResNet (13 conv layers, 64/128/256 channels) -> feature_dim; untrained unless --weights",
)
def _resnet_patch_cnn(feature_dim: int = 128, norm: str = "bn", **kw: Any) -> nn.Module:
    return ResNetPatchCNN(feature_dim=feature_dim, norm=norm, **kw)


# ---------------------------------------------------------------- hashing / tags
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


def encoder_tag(
    name: str, out_dim: int, weights_sha256: str, kwargs: dict[str, Any] | None = None
) -> str:
    """Folder name for an encoder's features: ``<name>-d<out_dim>-<8 hex>``.

    The hex part hashes the name, the architecture kwargs and the weights' SHA-256, so a
    change to any of them gives a new folder.
    """
    blob = json.dumps(
        {"name": name, "kwargs": kwargs or {}, "weights": weights_sha256},
        sort_keys=True,
        default=str,
    )
    return f"{_slug(name)}-d{int(out_dim)}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- weights files
def load_weights_file(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], str | None, dict[str, Any]]:
    """Read ``encoder.pt`` or a plain state_dict -> (state_dict, encoder name | None, kwargs)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"--weights {p} does not exist",
            "pass an encoder.pt from 'wsi-mil train --mode e2e' or a state_dict .pt file",
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a user-facing bad file
        why = torch_load_problem(p, e)
        if why is None:
            raise ConfigError(
                f"--weights {p} holds Python objects other than tensors and plain containers, "
                "which torch.load(weights_only=True) refuses",
                "save only the weights: torch.save(model.state_dict(), path)",
            ) from None
        raise ConfigError(
            f"--weights {p} cannot be loaded: it is not a PyTorch weights file ({why})",
            "pass an encoder.pt from 'wsi-mil train --mode e2e' or a state_dict saved with "
            "torch.save(model.state_dict(), path)",
        ) from None
    name, kwargs = None, {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        name = obj.get("encoder")
        kwargs = dict(obj.get("kwargs") or {})
        obj = obj["state_dict"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise ConfigError(
            f"--weights {p} is neither an encoder.pt ({{'encoder', 'kwargs', 'state_dict'}}) nor a state_dict of tensors"
        )
    return obj, (str(name) if name else None), kwargs


def torch_load_problem(path: str | os.PathLike, err: BaseException) -> str | None:
    """Why ``torch.load`` failed on ``path``, in words: None when the file is a real
    ``torch.save`` file that only holds objects ``weights_only=True`` refuses, else a short
    reason it is no PyTorch file at all (empty, safetensors, other zip, truncated archive,
    text, other bytes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if not head:
        return "the file is empty"
    if _is_safetensors(path, head):
        return (
            "it is a safetensors file, not torch.save output; convert it once with: python -c "
            '"import torch; from safetensors.torch import load_file; '
            f"torch.save(load_file('{path}'), 'weights.pt')\" and pass weights.pt"
        )
    if head.startswith(b"PK"):  # torch.save writes a zip archive holding <name>/data.pkl
        return _zip_problem(path, err)
    if head[:1] == b"\x80":  # a legacy (pickle) torch.save file
        return (
            None if "Weights only load failed" in str(err) else "not readable as torch.save output"
        )
    try:
        head.decode("utf-8")
        return "it is a text file, not torch.save output"
    except UnicodeDecodeError:
        return "its bytes are not torch.save output"


def _is_safetensors(path: str | os.PathLike, head: bytes) -> bool:
    """safetensors layout: 8-byte little-endian header length, then a JSON header ``{"...``."""
    if len(head) < 10 or not head[8:].lstrip(b" ").startswith(b'{"'):
        return False
    n = int.from_bytes(head[:8], "little")
    try:
        return 0 < n <= os.path.getsize(path) - 8
    except OSError:
        return False


def _zip_problem(path: str | os.PathLike, err: BaseException) -> str | None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a damaged or truncated zip archive (torch.save writes zip archives)"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") or "nothing"
        return f"it is a zip archive that is not torch.save output (no data.pkl; it holds {shown})"
    if isinstance(err, RuntimeError):
        return "a damaged or truncated torch.save archive"
    return None


def _strip_prefix(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``module.``, ``encoder.``, ``model.``) when the model has none."""
    for prefix in ("module.", "encoder.", "model.", "backbone."):
        if all(k.startswith(prefix) for k in sd) and not any(
            k.startswith(prefix) for k in expected
        ):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _load_state(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str) -> None:
    own = model.state_dict()
    sd = _strip_prefix(sd, set(own))
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:3]))
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise ConfigError(
            f"--weights {path} does not fit encoder {name!r}: {', '.join(parts)}",
            "check --encoder and --feature-dim (an encoder.pt carries its own)",
        )
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- factory
def create_encoder(
    name: str = DEFAULT_ENCODER,
    feature_dim: int = 128,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    norm: str = "bn",
    **kw: Any,
) -> nn.Module:
    """Build an encoder (eval mode, CPU) with ``.info``. Output: (n, info.out_dim) float.

    ``weights``: encoder.pt (its ``encoder``/``kwargs`` win over ``name``/``feature_dim``/``norm``;
    a different explicit ``name`` is an error) or a plain state_dict for the named encoder.
    ``norm``: "bn" | "groupnorm" ("frozen-bn" builds "bn"; freezing is the trainer's job).
    ``timm:<model>`` needs the optional extra (``pip install -e '.[timm]'`` in the clone).
    """
    sd: dict[str, torch.Tensor] | None = None
    wpath = Path(weights) if weights else None
    if wpath is not None:
        sd, ck_name, ck_kwargs = load_weights_file(wpath)
        if ck_name:
            if name and name != ck_name and name != DEFAULT_ENCODER:
                raise ConfigError(
                    f"--weights {wpath} is an encoder.pt for {ck_name!r}, but --encoder is {name!r}",
                    f"use --encoder {ck_name} or drop --encoder",
                )
            name = ck_name
            if "feature_dim" in ck_kwargs and int(ck_kwargs["feature_dim"]) != int(feature_dim):
                log.info(
                    "using feature_dim=%s from %s (not %s)",
                    ck_kwargs["feature_dim"],
                    wpath,
                    feature_dim,
                )
            feature_dim = int(ck_kwargs.pop("feature_dim", feature_dim))
            norm = str(ck_kwargs.pop("norm", norm))
            kw = {**ck_kwargs, **kw}
    if norm == "frozen-bn":
        norm = "bn"
    if name.startswith(TIMM_PREFIX):
        return _create_timm(name, wpath, sd, **kw)
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown encoder {name!r}",
            f"choose one of: {', '.join(list_encoders())}, or timm:<model>",
        )
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}", f"choose one of: {', '.join(NORMS)}")
    spec = _REGISTRY[name]
    kwargs = {"feature_dim": int(feature_dim), "norm": norm, **kw}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            model = spec.build(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"encoder {name!r}: bad arguments {kwargs}: {e}") from None
    if sd is not None:
        _load_state(model, sd, wpath, name)  # type: ignore[arg-type]
        sha = file_sha256(wpath)  # type: ignore[arg-type]
    else:
        sha = state_dict_sha256(model.state_dict())
    out_dim = _probe_out_dim(model, kwargs)
    info = EncoderInfo(
        name=name,
        input_px=spec.input_px,
        mean=spec.mean,
        std=spec.std,
        out_dim=out_dim,
        weights_sha256=sha,
        tag=encoder_tag(name, out_dim, sha, kwargs),
        kwargs=kwargs,
        trained=sd is not None,
        weights_path=str(wpath) if wpath else None,
        seed=None if sd is not None else int(seed),
    )
    model.eval()
    model.info = info  # type: ignore[assignment]
    return model


def _probe_out_dim(model: nn.Module, kwargs: dict[str, Any]) -> int:
    for attr in ("feature_dim", "num_features", "out_dim"):
        v = getattr(model, attr, None)
        if isinstance(v, int):
            return v
    return int(kwargs["feature_dim"])


def _create_timm(
    name: str, wpath: Path | None, sd: dict[str, torch.Tensor] | None, **kw: Any
) -> nn.Module:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise ConfigError(
            f"encoder {name!r} needs timm, which is not installed",
            "in the wsi-mil clone: pip install -e '.[timm]' (or pip install timm)",
        ) from None
    model_name = name[len(TIMM_PREFIX) :]
    pretrained = bool(kw.pop("pretrained", sd is None))
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kw)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"timm cannot create {model_name!r}: {e}",
            "check the model name (timm.list_models()) and network access for pretrained weights",
        ) from None
    if sd is not None:
        _load_state(model, sd, wpath, name)  # type: ignore[arg-type]
        sha = file_sha256(wpath)  # type: ignore[arg-type]
    else:
        sha = state_dict_sha256(model.state_dict())
    dc = resolve_data_config({}, model=model)
    out_dim = int(model.num_features)
    kwargs = {"pretrained": pretrained, **kw}
    model.eval()
    model.info = EncoderInfo(  # type: ignore[assignment]
        name=name,
        input_px=int(dc["input_size"][-1]),
        mean=tuple(float(v) for v in dc["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in dc["std"]),  # type: ignore[arg-type]
        out_dim=out_dim,
        weights_sha256=sha,
        tag=encoder_tag(name, out_dim, sha, kwargs),
        kwargs=kwargs,
        trained=pretrained or sd is not None,
        weights_path=str(wpath) if wpath else None,
    )
    return model


# ---------------------------------------------------------------- preprocessing
def preprocess(
    patches: np.ndarray | torch.Tensor,
    info: EncoderInfo | None = None,
    device: str | torch.device | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (n, P, P, 3) RGB -> float32 (n, 3, S, S) normalised with the encoder's mean/std.

    ``S`` is ``info.input_px`` (bilinear, antialiased resize) or ``P`` when the encoder takes
    any size. Runs on ``device`` if given (move uint8 first: 4x less to transfer), else where
    the input lives. Default normalisation: ImageNet mean/std (the default encoder's).
    ``memory_format=torch.channels_last`` skips a copy (the layout the pixels already have).
    """
    x = (
        torch.from_numpy(np.ascontiguousarray(patches))
        if isinstance(patches, np.ndarray)
        else patches
    )
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (n, P, P, 3) uint8 patches, got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()  # NHWC memory seen as NCHW: channels_last strides
    size = info.input_px if info is not None else None
    if size and (x.shape[-2] != size or x.shape[-1] != size):
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    mean = (
        torch.tensor(info.mean if info else IMAGENET_MEAN, dtype=x.dtype, device=x.device) * 255.0
    )
    std = torch.tensor(info.std if info else IMAGENET_STD, dtype=x.dtype, device=x.device) * 255.0
    x = x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
    return x.contiguous(memory_format=memory_format)
