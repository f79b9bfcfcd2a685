"""Tests for the NAS children: the child network, the plain and fast engines, dropout streams and masks, cache."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import config, nas
from helpers import run
from helpers.data import Split
from helpers.models import create_model, is_model
from helpers.models.nas_child import apply_dropout, dropout_scale
from helpers.nas.child_data import ChildData
from helpers.nas.dropout import uniform_words, uniform_words_numpy, uniform_words_torch
from helpers.nas.fast import engine as fast_engine
from helpers.nas.fast import kernels as fast_kernels
from helpers.nas.fast.engine import from_blocked, to_blocked

SPACE_F, SPACE_K = (16, 32, 64, 128), (3, 5)
A = [{"filters": 16, "kernel": 3, "dropout": 0.5}]
B = [{"filters": 32, "kernel": 5, "dropout": 0.1}]
C = [{"filters": 24, "kernel": 3, "dropout": 0.0}]
TWO = [{"filters": 16, "kernel": 5, "dropout": 0.25}, {"filters": 32, "kernel": 3, "dropout": 0.1}]
kernels_only = pytest.mark.skipif(not nas.kernels_available()[0],
                                  reason=f"fast-engine kernels unavailable: {nas.kernels_available()[1]}")


def _synthetic(n: int, seed: int) -> Split:
    """Images with flat background (max-pool ties) and bright blobs whose place depends on the label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 11, (n,), generator=g)
    img = torch.zeros(n, 1, 28, 28)
    for i, y in enumerate(labels.tolist()):
        r, c = 4 + 2 * (y % 4), 4 + 3 * (y // 4)
        img[i, 0, r:r + 8, c:c + 8] = 120 + 100 * torch.rand(8, 8, generator=g)
    return Split(img.round().clamp(0, 255).to(torch.uint8), labels)


@pytest.fixture(scope="module")
def splits():
    """512 train and 256 val images of the real OrganAMNIST when present, else synthetic ones."""
    root = config.data_root()
    if (root / "organamnist.npz").is_file():
        from helpers.data import load
        ds = load("organamnist", root=root, download=False)
        return ds["train"].take(range(512)), ds["val"].take(range(256))
    return _synthetic(512, 0), _synthetic(256, 1)




def _run(archs, splits, seeds, **kw):
    kw = {"num_classes": 11, "epochs": 2, "data_seed": 3, **kw}
    return nas.train_children(archs, splits[0], splits[1], seeds=seeds, **kw)


# ------------------------------------------------------------------- architecture and params --

@pytest.mark.parametrize("f", SPACE_F)
@pytest.mark.parametrize("k", SPACE_K)
def test_params_formula_one_layer(f, k):
    arch = [{"filters": f, "kernel": k, "dropout": 0.25}]
    expected = f * (k ** 2 + 2157) + 11
    assert nas.child_params(arch, 1, 11, 28) == expected
    assert sum(p.numel() for p in nas.NASChild(arch).parameters()) == expected


@pytest.mark.parametrize("arch,in_chans,classes,size", [(TWO, 1, 11, 28), (TWO, 3, 7, 28), (B, 3, 2, 64)])
def test_params_match_module(arch, in_chans, classes, size):
    model = nas.NASChild(arch, in_chans, classes, size)
    assert nas.child_params(arch, in_chans, classes, size) == sum(p.numel() for p in model.parameters())
    assert model(torch.zeros(2, in_chans, size, size)).shape == (2, classes)


def test_registry_builds_nas_child():
    assert is_model("nas_child")
    model = create_model("nas_child", num_classes=11, in_chans=1, arch=TWO, seed=0)
    assert isinstance(model, nas.NASChild) and model.arch == nas.normalize_arch(TWO)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 11)


@pytest.mark.parametrize("bad", [[], [{"filters": 16, "kernel": 4, "dropout": 0.1}],
                                 [{"filters": 16, "kernel": 3, "dropout": 1.0}],
                                 [{"filters": 16, "kernel": 3}], [{"filters": 0, "kernel": 3, "dropout": 0.1}]])
def test_bad_arch_rejected(bad):
    with pytest.raises(ValueError):
        nas.normalize_arch(bad)


def test_seeds_decide_init():
    torch.manual_seed(123)
    a1 = nas.NASChild(TWO, seed=1).state_dict()
    torch.manual_seed(999)                      # the global RNG plays no part
    a2 = nas.NASChild(TWO, seed=1).state_dict()
    b = nas.NASChild(TWO, seed=2).state_dict()
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
    assert all(not torch.equal(a1[k], b[k]) for k in a1)


# --------------------------------------------------------------------------- dropout stream --

def test_dropout_stream_deterministic_and_rates():
    u1, u2 = nas.DropoutStream(7).int16(400_000), nas.DropoutStream(7).int16(400_000)
    assert torch.equal(u1, u2)
    assert not torch.equal(u1, nas.DropoutStream(8).int16(400_000))
    for p in (0.1, 0.25, 0.5):
        kept = (u1 >= nas.keep_threshold(p)).double().mean().item()
        assert abs(kept - (1 - p)) < 4e-3


def test_dropout_stream_counter_and_numpy_agree():
    s = nas.DropoutStream(5)
    first, second = s.int16(10), s.int16(6)              # 3 words, then 2 words
    words = uniform_words_numpy(s.key, 0, 5)
    assert torch.equal(torch.cat([first, second]),
                       torch.from_numpy(np.concatenate([words[:3].view(np.int16)[:10], words[3:].view(np.int16)[:6]])))
    if nas.kernels_available()[0]:
        assert np.array_equal(uniform_words(s.key, 12345, 1001), uniform_words_numpy(s.key, 12345, 1001))


@pytest.mark.parametrize("seed,ctr", [(0, 0), (5, 12345), (2**31 - 1, 2**40 + 7)])
def test_dropout_words_torch_match_numpy_bit_for_bit(seed, ctr):
    """The on-device generator (used on a GPU; here run by PyTorch on the CPU) gives the same bits."""
    key = nas.DropoutStream(seed).key
    mine = uniform_words_torch(key, ctr, 4099, "cpu").numpy().view(np.uint64)
    assert np.array_equal(mine, uniform_words_numpy(key, ctr, 4099))


def test_dropout_stream_same_values_on_any_device_path():
    n = 1001
    host = nas.DropoutStream(3).int16(n)
    words = uniform_words_torch(nas.DropoutStream(3).key, 0, (n + 3) // 4, "cpu")
    assert torch.equal(words.view(torch.int16)[:n], host)
    if torch.cuda.is_available():
        assert torch.equal(nas.DropoutStream(3).int16(n, "cuda").cpu(), host)


# -------------------------------------------------------------------------------- kernels --

@kernels_only
@pytest.mark.parametrize("k,f,p,cin", [(3, 16, 0.5, 1), (5, 32, 0.0, 1), (5, 20, 0.25, 1), (3, 16, 0.1, 3)])
def test_fused_layer_matches_torch(k, f, p, cin):
    """Kernel forward/backward vs conv -> ReLU -> max-pool -> dropout in float64, ties included."""
    n, nc = 6, 11
    g = torch.Generator().manual_seed(k * f)
    x = torch.randn(n, cin, 28, 28, generator=g)
    x[:, :, :10] = -1.0                               # flat background: all-tie pooling windows
    x[:, :, 20:, 20:] = 0.5
    data = ChildData(Split((x * 0).to(torch.uint8), torch.zeros(n, dtype=torch.long)),
                    Split((x * 0).to(torch.uint8), torch.zeros(n, dtype=torch.long)), None, torch.device("cpu"))
    data.set_normalised("train", x)
    r = k // 2
    w = torch.randn(f, cin, k, k, generator=g) * 0.3
    b = torch.randn(f, generator=g) * 0.1
    hw = torch.randn(nc, 14, 14, f, generator=g) * 0.05   # head weights in (h, w, c) order
    stream = nas.DropoutStream(4)
    idx = torch.tensor([3, 0, 5, 1, 2, 4])
    st = {"xpad": data.padded("train", r), "idx": idx, "cin": cin, "P": 28 + 2 * r, "off": 0, "k": k, "s2": 14,
          "key": stream.key}
    kern = fast_kernels.get_kernels()
    w_t = w.permute(1, 2, 3, 0).reshape(-1, f).contiguous()
    nb = (f + 15) // 16
    hwb = to_blocked(hw)   # (NB, nc, Q, 16)
    acts = torch.empty(nb, n, 196, 16)
    code = torch.empty(nb, n, 196, 16, dtype=torch.uint8)
    logits = torch.zeros(n, nc)
    kern.forward(st, w_t, b, 0, p, acts, code, hwb, logits)
    # reference
    xd, wd, bd = x[idx].double(), w.double().requires_grad_(), b.double().requires_grad_()
    a = F.max_pool2d(F.relu(F.conv2d(xd, wd, bd, padding=r)), 2)
    if p > 0:
        u = torch.from_numpy(uniform_words_numpy(stream.key, 0, (n * 196 * f + 3) // 4).view(np.int16)[:n * 196 * f])
        keep = (u.view(n, 14, 14, f) >= nas.keep_threshold(p)).permute(0, 3, 1, 2)
        a = torch.where(keep, a * dropout_scale(p), 0.0)
    a = a.permute(0, 2, 3, 1)
    ref_logits = a.reshape(n, -1) @ hw.double().reshape(nc, -1).t()
    torch.testing.assert_close(from_blocked(acts, f, 14).double(), a, rtol=0, atol=1e-5)
    assert f % 16 == 0 or (acts[-1, ..., f % 16:] == 0).all()   # padded lanes of the last block
    torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    dl = torch.randn(n, nc, generator=g)
    ref_logits.backward(dl.double())
    for fused in (True, False):
        dw, db = torch.zeros(2, cin * k * k, f), torch.zeros(2, f)
        if fused:
            kern.backward(st, None, dl, hwb, code, p, dw, db)
        else:
            d_acts = (dl @ hw.reshape(nc, -1)).reshape(n, 14, 14, f)
            kern.backward(st, to_blocked(d_acts), None, None, code, p, dw, db)
        ref_w = wd.grad.permute(1, 2, 3, 0).reshape(-1, f)
        torch.testing.assert_close(dw.sum(0).double(), ref_w, rtol=1e-5, atol=1e-5 * ref_w.abs().max().item())
        torch.testing.assert_close(db.sum(0).double(), bd.grad, rtol=1e-5, atol=1e-5 * bd.grad.abs().max().item())


# -------------------------------------------------------------------------------- engines --

def test_unknown_engine_and_precision(splits):
    with pytest.raises(ValueError, match="unknown engine"):
        _run([A], splits, [0], engine="turbo")
    with pytest.raises(ValueError, match="unknown precision"):
        _run([A], splits, [0], precision="fp8")
    with pytest.raises(ValueError, match="one seed per arch"):
        _run([A, B], splits, [0])


def _assert_same(r1, r2, n_val, loss_tol=1e-4):
    for x, y in zip(r1, r2):
        assert abs(x["val_acc"] - y["val_acc"]) <= 1 / n_val + 1e-12, (x["arch"], x["val_acc"], y["val_acc"])
        np.testing.assert_allclose(x["epoch_losses"], y["epoch_losses"], rtol=loss_tol)
        assert x["params"] == y["params"]


def test_fast_equals_plain(splits, one_thread):
    archs, seeds = [A, B, C, TWO], [11, 12, 13, 14]
    plain = _run(archs, splits, seeds, engine="plain")
    fast = _run(archs, splits, seeds, engine="fast")
    _assert_same(plain, fast, len(splits[1]))
    assert sum(x["val_acc"] == y["val_acc"] for x, y in zip(plain, fast)) >= 3   # usually all equal
    for r in fast:
        assert set(r) >= {"val_acc", "params", "train_s", "final_train_loss", "cached"} and not r["cached"]
        assert r["final_train_loss"] == r["epoch_losses"][-1]


def test_fast_equals_plain_rgb(one_thread):
    g = torch.Generator().manual_seed(0)
    mk = lambda n: Split(torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g),
                         torch.randint(0, 7, (n,), generator=g))
    rgb = (mk(256), mk(128))
    kw = dict(num_classes=7, epochs=1, data_seed=0)
    plain = nas.train_children([B], *rgb, seeds=[5], engine="plain", **kw)
    fast = nas.train_children([B], *rgb, seeds=[5], engine="fast", **kw)
    _assert_same(plain, fast, 128)


def test_fast_torch_path_equals_plain(splits, monkeypatch, one_thread):
    monkeypatch.setattr(fast_kernels, "get_kernels", lambda: None)
    plain = _run([A, TWO], splits, [21, 22], engine="plain", epochs=1)
    fast = _run([A, TWO], splits, [21, 22], engine="fast", epochs=1)
    _assert_same(plain, fast, len(splits[1]))


def test_results_independent_of_grouping(splits):
    alone = _run([B], splits, [31])[0]
    for workers in (1, 2):
        group = _run([A, B, TWO], splits, [30, 31, 32], workers=workers)
        assert group[1]["val_acc"] == alone["val_acc"]
        assert group[1]["epoch_losses"] == alone["epoch_losses"]


def test_seed_and_data_seed_change_results(splits):
    base = _run([A], splits, [1], epochs=1)[0]
    other_seed = _run([A], splits, [2], epochs=1)[0]
    other_order = _run([A], splits, [1], epochs=1, data_seed=4)[0]
    assert base["epoch_losses"] != other_seed["epoch_losses"]
    assert base["epoch_losses"] != other_order["epoch_losses"]


def test_bf16_runs(splits, one_thread):
    for engine in ("plain", "fast"):
        r = _run([A], splits, [1], epochs=1, engine=engine, precision="bf16")[0]
        assert 0.0 <= r["val_acc"] <= 1.0 and np.isfinite(r["final_train_loss"])
        assert r["kernels_loaded"] is None          # the kernels do not apply to bf16
        assert r["engine_path"] == ("plain" if engine == "plain" else "fast: PyTorch ops (fallback)")


def test_the_engine_path_is_recorded(splits, one_thread):
    ok, _ = nas.kernels_available()
    two = [{"filters": 16, "kernel": 3, "dropout": 0.1}, {"filters": 16, "kernel": 3, "dropout": 0.1}]
    one, deep = _run([A, two], splits, [1, 2], epochs=1, engine="fast", max_train=128)
    assert one["kernels_loaded"] is ok and deep["kernels_loaded"] is ok
    assert one["engine_path"] == ("fast: C kernels, fused step" if ok else "fast: PyTorch ops (fallback)")
    assert deep["engine_path"] == ("fast: C kernels, first layer" if ok else "fast: PyTorch ops (fallback)")
    plain = _run([A], splits, [1], epochs=1, engine="plain", max_train=128)[0]
    assert plain["engine_path"] == "plain" and plain["kernels_loaded"] is None


# ---------------------------------------------------------------------------------- cache --

def test_cache(splits, tmp_path, monkeypatch):
    path = tmp_path / "children.jsonl"
    cache = nas.ChildCache(path)
    first = _run([A, B], splits, [1, 2], epochs=1, cache=cache)
    assert not any(r["cached"] for r in first) and len(cache) == 2
    with open(path, "a") as fh:
        fh.write('{"key": "broken", "res')               # a writer killed mid-line
    calls = []
    monkeypatch.setattr(fast_engine, "train_fast", lambda *a, **k: calls.append(a) or pytest.fail("should be cached"))
    again = _run([A, B], splits, [1, 2], epochs=1, cache=nas.ChildCache(path))
    assert all(r["cached"] for r in again) and not calls
    assert [r["val_acc"] for r in again] == [r["val_acc"] for r in first]
    cache.compact()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["key"] for line in lines)
    monkeypatch.undo()
    other = _run([A], splits, [1], epochs=2, cache=cache)[0]           # other settings: a miss
    assert not other["cached"] and len(cache) == 3


def test_cache_key_holds_the_data(splits, tmp_path):
    """Same arch, seed and settings on other images (or another val split) is a miss, not a stale hit."""
    cache = nas.ChildCache(tmp_path / "children.jsonl")
    kw = dict(epochs=1, max_train=128, cache=cache)
    first = _run([A], splits, [1], **kw)[0]
    assert not first["cached"] and _run([A], splits, [1], **kw)[0]["cached"]
    train, val = splits
    flipped = Split(train.images.flip(-1).contiguous(), train.labels)
    other = _run([A], (flipped, val), [1], **kw)[0]
    assert not other["cached"] and len(cache) == 2
    fewer_val = Split(val.images[:128].clone(), val.labels[:128].clone())
    assert not _run([A], (train, fewer_val), [1], **kw)[0]["cached"] and len(cache) == 3


# ---------------------------------------------------------------------------- dropout masks --

@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_dropout_keeps_exactly_the_uniforms_at_or_above_the_threshold(p):
    """Every int16 value once: the kept ones are exactly u >= keep_threshold(p), the boundary included."""
    u = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    kept = apply_dropout(torch.ones(u.shape), u, p) != 0
    thr = nas.keep_threshold(p)
    assert torch.equal(kept, u >= thr) and bool(kept[u == thr].all()) and not bool(kept[u == thr - 1].any())
    assert int(kept.sum()) == 32768 - thr
    if p in (0.25, 0.5):
        assert int(kept.sum()) == round((1 - p) * 65536)          # exact keep probability


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_plain_child_dropout_masks_are_the_stream_threshold(p):
    layer = nas.NASChild([{"filters": 16, "kernel": 3, "dropout": p}]).features[3].train()
    stream = nas.DropoutStream(9)
    layer.stream = stream
    x = torch.ones(40, 16, 14, 14)
    out = layer(x)
    u = torch.from_numpy(uniform_words_numpy(stream.key, 0, (x.numel() + 3) // 4).view(np.int16)[:x.numel()])
    u = u.view(40, 14, 14, 16).permute(0, 3, 1, 2)
    assert bool((u == nas.keep_threshold(p)).any())                 # the boundary occurs: the test can see it
    assert torch.equal(out != 0, u >= nas.keep_threshold(p))


@kernels_only
@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_fast_kernel_dropout_masks_are_the_stream_threshold(p):
    """The fused kernel's kept activations are exactly those with u >= keep_threshold(p), compared mask
    to mask (positive pre-dropout activations everywhere, so ReLU hides nothing)."""
    n, f, cin, k = 64, 32, 1, 3
    x = torch.zeros(n, cin, 28, 28)
    data = ChildData(Split(torch.zeros(n, cin, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)),
                     Split(torch.zeros(n, cin, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)),
                     None, torch.device("cpu"))
    data.set_normalised("train", x)
    w_t = torch.zeros(cin * k * k, f)
    b = torch.linspace(0.5, 1.5, f)
    stream = nas.DropoutStream(11)
    ctr = 5
    st = {"xpad": data.padded("train", 1), "idx": torch.arange(n), "cin": cin, "P": 30, "off": 0, "k": k, "s2": 14,
          "key": stream.key}
    nb = (f + 15) // 16
    acts = torch.empty(nb, n, 196, 16)
    code = torch.empty(nb, n, 196, 16, dtype=torch.uint8)
    fast_kernels.get_kernels().forward(st, w_t, b, ctr, p, acts, code)
    m = n * 196 * f
    u = torch.from_numpy(uniform_words_numpy(stream.key, ctr, (m + 3) // 4).view(np.int16)[:m]).view(n, 14, 14, f)
    thr = nas.keep_threshold(p)
    assert int((u == thr).sum()) > 0                                 # the boundary occurs: the test can see it
    got = from_blocked(acts, f, 14)
    assert torch.equal(got != 0, u >= thr)
    assert torch.equal(got, torch.where(u >= thr, b * dropout_scale(p), 0.0))


# ------------------------------------------------------------------- packaging and staleness --

def test_kernel_is_package_data():
    src = fast_kernels.kernel_source()
    assert "void nas_fwd(" in src and "_mm256_cmpge_epi16_mask" in src
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"helpers.nas.fast" = ["*.c"]' in pyproject          # non-editable installs ship it too


def test_editing_the_kernel_marks_a_finished_nas_run_stale(tmp_path, monkeypatch):
    """The runner's inputs digest covers the .c kernel, so a finished NAS run is redone after an edit."""
    from helpers import config

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "helpers", tmp_path / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(config, "repo_root", lambda: tmp_path)
    nb = root / "notebooks" / "nas.ipynb"
    before = run.inputs_digest(nb, {"episodes": 8})
    assert run.inputs_digest(nb, {"episodes": 8}) == before
    kernel = tmp_path / "helpers" / "nas" / "fast" / "kernels.c"
    kernel.write_text(kernel.read_text().replace("_CMP_GT_OQ", "_CMP_GE_OQ", 1))
    assert run.inputs_digest(nb, {"episodes": 8}) != before


def test_create_model_nas_child_in_a_fresh_interpreter():
    code = ("import sys; from helpers.models import create_model; "
            "m = create_model('nas_child', num_classes=3, arch=[{'filters': 8, 'kernel': 3, 'dropout': 0.1}]); "
            "assert 'helpers.nas' not in sys.modules; print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "NASChild", out.stderr
