"""Encoder registry, ResNetPatchCNN architecture, weights loading, tags, preprocessing."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from wsi_mil.errors import ConfigError
from wsi_mil.features import (
    ResNetPatchCNN,
    create_encoder,
    encoder_tag,
    list_encoders,
    preprocess,
    register_encoder,
)
from wsi_mil.features.resnet import main_path_conv_count


def test_resnet_architecture_matches_seed():
    m = ResNetPatchCNN()
    assert main_path_conv_count(m) == 13
    stem_conv = m.stem[0]
    assert stem_conv.kernel_size == (7, 7) and stem_conv.stride == (2, 2)
    assert isinstance(m.stem[3], nn.MaxPool2d) and m.stem[3].stride == 2
    widths = [blk.conv2.out_channels for layer in (m.layer1, m.layer2, m.layer3) for blk in layer]
    assert widths == [64, 64, 128, 128, 256, 256]
    strides = [layer[0].conv1.stride[0] for layer in (m.layer1, m.layer2, m.layer3)]
    assert strides == [1, 2, 2]
    m.eval()
    with torch.inference_mode():
        assert m(torch.zeros(3, 3, 224, 224)).shape == (3, 128)
        assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 128)


def test_groupnorm_option_has_no_batchnorm():
    m = create_encoder(norm="groupnorm", feature_dim=32)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert any(isinstance(x, nn.GroupNorm) for x in m.modules())
    assert m.info.out_dim == 32 and m.info.kwargs["norm"] == "groupnorm"
    # frozen-bn is a training mode, architecturally plain BN
    assert create_encoder(norm="frozen-bn").info.tag == create_encoder(norm="bn").info.tag


def test_seeded_init_is_deterministic_and_tagged():
    a, b, c = create_encoder(seed=0), create_encoder(seed=0), create_encoder(seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert a.info.weights_sha256 == b.info.weights_sha256 != c.info.weights_sha256
    assert a.info.tag == b.info.tag != c.info.tag
    assert a.info.tag.startswith("resnet-patch-cnn-d128-")
    assert not a.info.trained and a.info.seed == 0
    # the global RNG is not disturbed by building an encoder
    torch.manual_seed(123)
    r1 = torch.rand(3)
    torch.manual_seed(123)
    create_encoder(seed=5)
    assert torch.equal(r1, torch.rand(3))


def test_tag_changes_with_dim_norm_and_weights():
    base = create_encoder()
    assert create_encoder(feature_dim=64).info.tag != base.info.tag
    assert create_encoder(feature_dim=64).info.tag.startswith("resnet-patch-cnn-d64-")
    assert create_encoder(norm="groupnorm").info.tag != base.info.tag
    t1 = encoder_tag("x", 8, "a" * 64, {"k": 1})
    assert t1 == encoder_tag("x", 8, "a" * 64, {"k": 1})
    assert t1 != encoder_tag("x", 8, "b" * 64, {"k": 1}) != encoder_tag("x", 8, "a" * 64, {"k": 2})
    assert encoder_tag("timm:hf-hub:org/model", 1024, "a" * 64).startswith(
        "timm-hf-hub-org-model-d1024-"
    )


def test_encoder_pt_checkpoint_loads_with_its_own_kwargs(tmp_path):
    src = create_encoder(feature_dim=48, norm="groupnorm", seed=3)
    with torch.no_grad():
        src.fc.bias.fill_(0.25)  # "trained"
    ck = tmp_path / "encoder.pt"
    torch.save(
        {
            "encoder": "resnet-patch-cnn",
            "kwargs": {"feature_dim": 48, "norm": "groupnorm"},
            "state_dict": src.state_dict(),
        },
        ck,
    )
    m = create_encoder(weights=ck)  # feature_dim/norm come from the checkpoint
    assert m.info.out_dim == 48 and m.info.kwargs["norm"] == "groupnorm" and m.info.trained
    assert m.info.weights_sha256 == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert m.info.tag != src.info.tag
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(m(x), src(x))
    with pytest.raises(ConfigError, match="timm:foo"):
        create_encoder("timm:foo", weights=ck)


def test_plain_state_dict_and_prefixes(tmp_path):
    src = create_encoder(feature_dim=16, seed=7)
    p = tmp_path / "sd.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, p)
    m = create_encoder(feature_dim=16, weights=p)
    for k, v in src.state_dict().items():
        assert torch.equal(v, m.state_dict()[k])
    assert m.info.weights_sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_bad_weights_give_clear_errors(tmp_path):
    src = create_encoder(feature_dim=16)
    p = tmp_path / "sd16.pt"
    torch.save(src.state_dict(), p)
    with pytest.raises(ConfigError, match=r"does not fit encoder.*shape mismatch.*fc"):
        create_encoder(feature_dim=128, weights=p)
    with pytest.raises(ConfigError, match="does not exist"):
        create_encoder(weights=tmp_path / "nope.pt")

    bad = tmp_path / "evil.pt"  # arbitrary pickled objects must be refused by weights_only=True
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": argparse.Namespace(a=1)}, bad)
    with pytest.raises(ConfigError, match="weights_only=True"):
        create_encoder(weights=bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        create_encoder(weights=junk)


def test_foreign_weights_files_are_named(tmp_path):
    """safetensors (HF/timm/UNI weights) and non-torch zips (.npz) say what they are."""
    import json
    import struct

    import numpy as np

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    st = tmp_path / "model.safetensors"
    st.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    with pytest.raises(ConfigError, match=r"safetensors file.*load_file.*torch\.save") as e:
        create_encoder(weights=st)
    assert "text file" not in str(e.value)

    npz = tmp_path / "w.npz"
    np.savez(npz, w=np.zeros(2))
    with pytest.raises(ConfigError, match=r"zip archive that is not torch\.save.*w\.npy") as e:
        create_encoder(weights=npz)
    assert "damaged" not in str(e.value)

    good = tmp_path / "sd.pt"  # a real torch.save archive, cut short
    torch.save(create_encoder(feature_dim=16).state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ConfigError, match="damaged or truncated"):
        create_encoder(weights=cut)


def test_unknown_encoder_and_registry():
    with pytest.raises(ConfigError, match="unknown encoder"):
        create_encoder("nope")
    assert "resnet-patch-cnn" in list_encoders()

    @register_encoder("tiny-test-encoder", input_px=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    def _tiny(feature_dim: int = 4, norm: str = "bn") -> nn.Module:
        m = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16 * 3, feature_dim))
        m.feature_dim = feature_dim
        return m

    m = create_encoder("tiny-test-encoder", feature_dim=4)
    assert m.info.input_px == 16 and m.info.mean == (0.5, 0.5, 0.5) and m.info.out_dim == 4


@pytest.mark.skipif(
    importlib.util.find_spec("timm") is not None,
    reason="timm installed: the error path cannot occur",
)
def test_timm_without_extra_names_the_install_command():
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[timm\]'"):
        create_encoder("timm:resnet18")


def test_preprocess_normalises_and_resizes():
    patches = np.full((2, 8, 8, 3), 255, np.uint8)
    x = preprocess(patches)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    expect = (1.0 - 0.485) / 0.229
    assert torch.allclose(x[:, 0], torch.full((2, 8, 8), expect))
    m = create_encoder()
    info = m.info
    info.input_px = 16  # an encoder with a fixed input size resizes patches to it
    assert preprocess(torch.from_numpy(patches), info).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="expected"):
        preprocess(np.zeros((8, 8, 3), np.uint8))
