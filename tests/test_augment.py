"""helpers.augment: batched per-sample augmentation and the albumentations wrapper."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.augment import (  # noqa: E402
    SPEC_KEYS,
    AlbumentationsAugment,
    BatchAugment,
    erase_masks,
    make_augment,
    random_affine_theta,
)
from helpers.config import ParamsError  # noqa: E402


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _image(channels=1, size=16, seed=0):
    """An asymmetric image in [0, 1] (a bright blob off centre on a gradient)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(channels, size, size, generator=g) * 0.3
    img[:, 2:7, 3:11] += 0.6
    return img.clamp(0, 1)


def _batch(n=8, channels=1, size=16):
    return _image(channels, size).unsqueeze(0).repeat(n, 1, 1, 1)


def _all_distinct(x):
    flat = x.flatten(1)
    n = len(flat)
    return all(not torch.allclose(flat[i], flat[j], atol=1e-6) for i in range(n) for j in range(i + 1, n))


@pytest.mark.parametrize("spec", [{"rotate": 30}, {"crop_scale": [0.5, 0.9]}, {"translate": 0.2},
                                  {"scale": [0.7, 1.3]}, {"brightness": 0.3, "contrast": 0.3}])
def test_every_image_draws_its_own_transform(spec):
    x = _batch(8)
    out = make_augment(spec)(x.clone(), _gen(0))
    assert out.shape == x.shape
    assert _all_distinct(out)
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("key,dim", [("hflip", -1), ("vflip", -2)])
def test_flip_with_p1_is_exact_flip(key, dim):
    x = torch.stack([_image(seed=i) for i in range(5)])
    out = make_augment({key: 1.0})(x.clone(), _gen(0))
    assert torch.equal(out, x.flip(dim))


def test_hflip_half_flips_some_and_keeps_others():
    x = torch.stack([_image(seed=i) for i in range(64)])
    out = make_augment({"hflip": 0.5})(x.clone(), _gen(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert torch.all(flipped ^ kept)
    assert 16 < flipped.sum() < 48


@pytest.mark.parametrize("spec", [{"rotate": 0, "hflip": 0}, {"scale": [1.0, 1.0]},
                                  {"translate": 0.0, "erase": 0}, {"crop_scale": [1.0, 1.0]}])
def test_identity_specs_keep_the_image(spec):
    x = torch.stack([_image(seed=i) for i in range(4)])
    out = BatchAugment(spec)(x.clone(), _gen(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_empty_spec_is_none():
    assert make_augment(None) is None
    assert make_augment({}) is None
    with pytest.raises(ParamsError):
        make_augment(["hflip"])


def test_same_generator_seed_same_result():
    spec = {"rotate": 20, "crop_scale": [0.6, 1.0], "hflip": 0.5, "brightness": 0.2, "erase": 0.5}
    aug = make_augment(spec)
    x = torch.stack([_image(seed=i) for i in range(6)])
    a = aug(x.clone(), _gen(3))
    b = aug(x.clone(), _gen(3))
    c = aug(x.clone(), _gen(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_unknown_key_names_it():
    with pytest.raises(ParamsError) as err:
        make_augment({"hflip": 0.5, "rotation": 10})
    msg = str(err.value)
    assert "rotation" in msg and "rotate" in msg  # names the key and suggests the close one
    for key in SPEC_KEYS:
        assert key in msg


def test_three_channels_share_the_geometric_transform():
    x = _batch(4, channels=3)
    x[:, 1] = x[:, 0]
    x[:, 2] = x[:, 0]
    out = make_augment({"rotate": 40, "translate": 0.1, "hflip": 0.5})(x.clone(), _gen(0))
    assert out.shape == (4, 3, 16, 16)
    assert _all_distinct(out)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 0], out[:, 2])


def test_erase_zeros_one_region():
    x = torch.full((6, 2, 20, 20), 0.7)
    out = make_augment({"erase": 1.0, "erase_scale": [0.1, 0.2]})(x.clone(), _gen(0))
    for img in out:
        zero = img[0] == 0
        assert torch.equal(zero, img[1] == 0)  # same box in every channel
        assert torch.allclose(img[~(img == 0)], torch.tensor(0.7))
        area = zero.sum().item()
        assert 0.05 * 400 <= area <= 0.3 * 400
        rows = zero.any(1).nonzero().flatten()
        cols = zero.any(0).nonzero().flatten()
        # a single filled rectangle
        assert zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert area == len(rows) * len(cols)
    masks = erase_masks(100, 10, 10, _gen(0), p=0.0)
    assert masks.sum() == 0


def test_rotation_matrix_is_orthonormal_and_identity_when_off():
    theta = random_affine_theta(5, _gen(0), rotate=45)
    rot = theta[:, :, :2]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(2).expand(5, 2, 2), atol=1e-6)
    assert torch.allclose(theta[:, :, 2], torch.zeros(5, 2))
    off = random_affine_theta(3, _gen(0))
    assert torch.equal(off, torch.eye(3)[:2].expand(3, 2, 3))


def test_albumentations_hflip_exact():
    A = pytest.importorskip("albumentations")
    aug = AlbumentationsAugment(A.Compose([A.HorizontalFlip(p=1.0)]))
    for channels in (1, 3):
        x = torch.stack([_image(channels, seed=i) for i in range(4)])
        out = aug(x.clone(), _gen(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.allclose(out, x.flip(-1))


def test_albumentations_reproducible_from_generator():
    A = pytest.importorskip("albumentations")
    aug = AlbumentationsAugment(A.Compose([A.HorizontalFlip(p=0.5), A.Rotate(limit=30, p=1.0)]))
    x = torch.stack([_image(seed=i) for i in range(6)])
    a = aug(x.clone(), _gen(5))
    b = aug(x.clone(), _gen(5))
    assert torch.equal(a, b)
    c = aug(x.clone(), _gen(6))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("pad", ["border", "reflection"])
def test_pad_fills_the_uncovered_border_from_the_image_not_with_black(pad):
    """A bright constant image shifted by 20 %: zero padding leaves black strips, the others none."""
    x = torch.full((6, 1, 16, 16), 0.8)
    zeros = make_augment({"translate": 0.2})(x.clone(), _gen(0))
    filled = make_augment({"translate": 0.2, "pad": pad})(x.clone(), _gen(0))
    assert (zeros < 0.5).any()
    assert torch.allclose(filled, x, atol=1e-5)


def test_pad_refuses_an_unknown_fill_naming_the_fix():
    with pytest.raises(ParamsError, match="pad='wrap'.*zeros, border, reflection"):
        make_augment({"rotate": 10, "pad": "wrap"})
    assert "pad" in SPEC_KEYS
