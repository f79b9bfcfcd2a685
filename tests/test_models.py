"""Tests for helpers.models: registry, blocks and every registered architecture."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import densenet121 as tv_densenet121

from helpers.models import (
    ResidualBlock,
    SEModule,
    SpatialAttention,
    create_model,
    is_dense,
    list_models,
    register_model,
    unregister_model,
)

NUM_CLASSES = 3


def _kwargs_at_28(name: str) -> dict[str, object]:
    return {"small_input": True} if name.startswith("densenet") else {}


def _check_forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient for {pname}"


def test_builtin_models_registered() -> None:
    names = list_models()
    assert names == sorted(names)
    for name in ("cnn", "resnet", "seresnet", "seresnet_mura", "densenet121"):
        assert name in names


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", [n for n in list_models() if not is_dense(n)])  # dense: tests/test_apga.py
def test_forward_backward_28(name: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, in_chans=in_chans, **_kwargs_at_28(name))
    _check_forward_backward(model, torch.randn(2, in_chans, 28, 28))


def test_densenet_default_stem_64() -> None:
    model = create_model("densenet121", num_classes=NUM_CLASSES, in_chans=1)
    _check_forward_backward(model, torch.randn(2, 1, 64, 64))


def test_seresnet_224_forward() -> None:
    model = create_model("seresnet_mura", num_classes=NUM_CLASSES, in_chans=1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 224, 224))
    assert out.shape == (1, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_cnn_minimum_input_size() -> None:
    model = create_model("cnn", num_classes=NUM_CLASSES, dropout=0.2)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, NUM_CLASSES)


def test_unknown_model_name() -> None:
    with pytest.raises(KeyError) as info:
        create_model("no_such_net", num_classes=NUM_CLASSES)
    message = str(info.value)
    assert "no_such_net" in message
    for name in list_models():
        assert name in message


@pytest.mark.parametrize("name", ["cnn", "seresnet", "resnet"])
def test_unknown_kwarg(name: str) -> None:
    with pytest.raises(TypeError, match="bogus_option"):
        create_model(name, num_classes=NUM_CLASSES, bogus_option=1)


def test_register_custom_model() -> None:
    @register_model("_test_linear")
    def _linear(num_classes: int, in_chans: int = 1) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_chans, num_classes))

    try:
        assert "_test_linear" in list_models()
        model = create_model("_test_linear", num_classes=NUM_CLASSES, in_chans=2)
        assert model(torch.randn(4, 2, 28, 28)).shape == (4, NUM_CLASSES)
        with pytest.raises(ValueError, match="already registered"):
            register_model("_test_linear")(lambda num_classes, in_chans: nn.Identity())
    finally:
        unregister_model("_test_linear")
    assert "_test_linear" not in list_models()


def test_resnet_has_no_attention() -> None:
    model = create_model("resnet", num_classes=NUM_CLASSES)
    assert not any(isinstance(m, (SEModule, SpatialAttention)) for m in model.modules())
    mura = create_model("seresnet_mura", num_classes=NUM_CLASSES)
    assert any(isinstance(m, SEModule) for m in mura.modules())
    assert any(isinstance(m, SpatialAttention) for m in mura.modules())


def test_se_module_rescales() -> None:
    se = SEModule(32, reduction=16)
    assert se.fc1.out_channels == 8  # max(min_hidden=8, 32 // 16)
    x = torch.rand(2, 32, 5, 5) + 0.1
    out = se(x)
    assert out.shape == x.shape
    gate = se.gate(x)
    assert gate.shape == (2, 32, 1, 1)
    assert ((gate > 0) & (gate < 1)).all()
    ratio = out / x
    assert ((ratio > 0) & (ratio < 1)).all()
    torch.testing.assert_close(out, x * gate)


def test_spatial_attention_shape() -> None:
    att = SpatialAttention(16)
    assert att.conv1.out_channels == 8
    x = torch.randn(2, 16, 7, 7)
    a = att.attention(x)
    assert a.shape == (2, 1, 7, 7)
    assert ((a > 0) & (a < 1)).all()
    assert att(x).shape == x.shape


@pytest.mark.parametrize(("in_ch", "out_ch", "stride", "se"), [(8, 8, 1, False), (8, 16, 2, True)])
def test_residual_block(in_ch: int, out_ch: int, stride: int, se: bool) -> None:
    block = ResidualBlock(in_ch, out_ch, stride=stride, se=se)
    out = block(torch.randn(2, in_ch, 8, 8))
    assert out.shape == (2, out_ch, 8 // stride, 8 // stride)
    assert (out >= 0).all()
    assert isinstance(block.shortcut, nn.Identity) == (in_ch == out_ch and stride == 1)


def _old_style(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys as in the original torchvision checkpoints (``norm1`` -> ``norm.1``)."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(.*)$")
    renamed = {}
    for key, value in state.items():
        m = pattern.match(key)
        renamed[f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else key] = value
    return renamed


@pytest.mark.parametrize("old_keys", [False, True])
def test_densenet_local_weights(tmp_path: Path, old_keys: bool) -> None:
    torch.manual_seed(0)
    reference = tv_densenet121(weights=None)
    state = reference.state_dict()
    path = tmp_path / "densenet121.pth"
    torch.save(_old_style(state) if old_keys else state, path)
    if old_keys:
        assert "features.denseblock1.denselayer1.norm.1.weight" in torch.load(path)

    model = create_model("densenet121", num_classes=NUM_CLASSES, in_chans=1, weights=str(path))
    # Documented behaviour: the 1-channel stem is the SUM of the RGB filters.
    expected = state["features.conv0.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.features.conv0.weight, expected)
    loaded = model.state_dict()
    for key in ("features.denseblock1.denselayer1.norm1.weight", "features.norm5.running_var"):
        torch.testing.assert_close(loaded[key], state[key])
    assert model.classifier.out_features == NUM_CLASSES


def test_densenet_local_weights_small_input(tmp_path: Path) -> None:
    reference = tv_densenet121(weights=None)
    path = tmp_path / "densenet121.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("densenet121", num_classes=NUM_CLASSES, in_chans=3, weights=path, small_input=True)
    assert model.features.conv0.weight.shape == (64, 3, 3, 3)
    torch.testing.assert_close(
        model.features.norm5.weight, reference.state_dict()["features.norm5.weight"]
    )


def test_densenet_missing_weights(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "densenet121.pth"
    with pytest.raises(FileNotFoundError) as info:
        create_model("densenet121", num_classes=NUM_CLASSES, weights=str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "downloaded beforehand" in message


# ---- timm through the registry -------------------------------------------------------------
def test_timm_models_through_the_registry(tmp_path):
    import timm

    from helpers.models import create_model, is_model
    assert is_model("timm/resnet10t") and not is_model("timm/notanet")
    m = create_model("timm/resnet10t", num_classes=3, in_chans=1)
    out = m(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 3)
    with pytest.raises(KeyError, match="unknown timm model"):
        create_model("timm/notanet", num_classes=3)
    # pre-trained weights only from a local file: the body is loaded, the new head and stem adapted
    src = timm.create_model("resnet10t", num_classes=1000, in_chans=3)
    path = tmp_path / "resnet10t.pth"
    torch.save(src.state_dict(), path)
    m = create_model("timm/resnet10t", num_classes=5, in_chans=1, pretrained_file=path)
    assert torch.equal(m.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert torch.allclose(m.conv1[0].weight, src.conv1[0].weight.sum(1, keepdim=True))
    assert m.fc.weight.shape == (5, 512)
    with pytest.raises(FileNotFoundError, match="no download"):
        create_model("timm/resnet10t", num_classes=5, pretrained_file=tmp_path / "missing.pth")
