"""Tests of the APGA agent's training settings and the chapter's evaluation (helpers/apga):
BatchNorm statistics re-estimated for evaluation, mask cells, several agent updates per batch,
the start probability, the area cost, the per-update record, the faithful group, and that the
agent learns on a toy task whose label lives in a known region."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from helpers import data as data_mod
from helpers.apga import APGAHook, PreciseBNScorer, cell_logits, fill_value, recompute_bn_stats, to_pixels
from helpers.apga.protocol import REFERENCE_APGA, faithful_group, make_hook
from helpers.models import create_model
from helpers.train import FitConfig, fit
from toys import square_ds, train_plain


def _square_ds(n: int = 24, size: int = 16, seed: int = 0) -> data_mod.MedMNIST:
    """The label lives only in a fixed 4x4 square at rows and columns 6-9 (class 1)."""
    return square_ds((n, n), size, seed, side=4, at=6)


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var)]


# ---- BatchNorm statistics for evaluation ----------------------------------------------------------------
def test_recompute_bn_stats_averages_the_loader_and_restores_momentum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(1))
    images = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8)
    split = data_mod.Split(images, torch.zeros(32, dtype=torch.long))
    loader = data_mod.TensorLoader(split, 16)                    # two batches of 16
    x = images.float().div(255).sub(0.5).div(0.5)
    assert recompute_bn_stats(net, loader) == 32
    bn = net[0]
    assert torch.allclose(bn.running_mean, x.mean().view(1), atol=1e-5)   # equal batches: the mean of batch means
    halves = [h.flatten().var() for h in x.split(16)]
    assert torch.allclose(bn.running_var, torch.stack(halves).mean().view(1), atol=1e-5)
    assert bn.momentum == 0.1 and not net.training
    assert recompute_bn_stats(nn.Sequential(nn.Conv2d(1, 1, 1)), loader) == 0    # no BatchNorm: nothing to do


def test_precise_bn_scorer_evaluates_with_statistics_of_the_training_images():
    ds = _square_ds(16)
    torch.manual_seed(0)
    model = create_model("cnn", 2, 1, widths=(4, 8))
    for m in model.modules():                                    # statistics that lag far behind (as at start)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
    scorer = PreciseBNScorer(ds["train"], ds.task, 8)
    val = data_mod.TensorLoader(ds["val"], 64)
    metrics, scores, labels = scorer(model, val, "val")
    assert {"val/acc", "val/auc", "val/loss"} <= set(metrics) and len(scores) == len(labels) == len(ds["val"])
    expected = copy.deepcopy(model)
    recompute_bn_stats(expected, data_mod.TensorLoader(ds["train"], 8))
    assert all(torch.allclose(a, b) for a, b in zip(_bn_buffers(model), _bn_buffers(expected)))
    assert not any(torch.all(m.running_mean == 5.0) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert repr(scorer) == repr(PreciseBNScorer(ds["train"], ds.task, 8))   # a stable unit fingerprint
    assert "0x" not in repr(scorer)


# ---- cells, steps, start probability, record ----------------------------------------------------------
def test_cells_average_the_logits_and_cover_every_pixel():
    z = torch.arange(15 * 15, dtype=torch.float32).view(1, 1, 15, 15)
    cells = cell_logits(z, 4)
    assert cells.shape == (1, 1, 4, 4)
    assert cells[0, 0, 0, 0] == z[0, 0, :4, :4].mean() and cells[0, 0, 3, 3] == z[0, 0, 12:, 12:].mean()
    back = to_pixels(cells, 4, (15, 15))
    assert back.shape == z.shape and back[0, 0, 13, 5] == cells[0, 0, 3, 1]
    assert torch.equal(cell_logits(z, 1), z) and torch.equal(to_pixels(z, 1, (15, 15)), z)


class _Zero(nn.Module):
    """An agent whose every logit is 0 (trainable, so the optimiser has a parameter)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.w * x[:, :1]


def test_init_erase_p_sets_the_starting_probability():
    for p in (0.1, 0.5):
        hook = APGAHook("binary-class", _Zero(), -1.0, init_erase_p=p, mask_cell=2)
        probs = hook.erase_probability(torch.randn(2, 1, 9, 9))
        assert probs.shape == (2, 1, 9, 9) and torch.allclose(probs, torch.full_like(probs, p))
    with pytest.raises(ValueError, match="init_erase_p"):
        APGAHook("binary-class", _Zero(), -1.0, init_erase_p=1.0)


class _Blind(nn.Module):
    """A classifier that ignores its input: erasing never changes its loss."""

    def forward(self, x):
        return torch.zeros(len(x), 2)


def test_area_cost_prices_the_erased_share():
    torch.manual_seed(0)
    hook = APGAHook("binary-class", create_model("unet_small", 1, 1, widths=(4, 8)), -1.0, agent_steps=3,
                    area_cost=2.0, init_erase_p=0.5)
    model = _Blind()
    hook.on_fit_start(model, None, torch.device("cpu"))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    hook.agent_steps_on(x, y, hook.criterion(model(x), y), model)
    trace = np.asarray(hook.trace)
    col = {name: trace[:, i] for i, name in enumerate(APGAHook.TRACE)}
    assert len(trace) == 3 and np.allclose(col["loss_gain"], 0.0)
    assert np.allclose(col["reward"], -2.0 * col["erase_area"], atol=1e-6) and (col["erase_area"] > 0).all()


def _fit(hook, ds, epochs=2, lr=1e-4, seed=0, weights=None):
    torch.manual_seed(seed)
    model = create_model("cnn", 2, 1, widths=(8, 16))
    if weights is not None:
        model.load_state_dict(weights)
    loader = data_mod.TensorLoader(ds["train"], 16, shuffle=True, seed=seed)
    val = data_mod.TensorLoader(ds["val"], 64)
    return fit(model, loader, val, ds.task, FitConfig(epochs=epochs, lr=lr, schedule="none", progress="none",
                                                      channels_last=False), hooks=[hook])


def test_agent_steps_per_batch_and_the_record_of_the_whole_run():
    ds = _square_ds(12)                                     # 24 images: 2 batches of 16
    hook = APGAHook("binary-class", create_model("unet_small", 1, 1, widths=(4, 8)), -1.0, agent_steps=3)
    res = _fit(hook, ds, epochs=2)
    trace = hook.unit_arrays()["agent_trace"]
    assert trace.shape == (2 * 2 * 3, len(APGAHook.TRACE))  # every update of both epochs, whatever the best epoch
    assert np.isfinite(trace).all() and res.history["rl/reward"].notna().all()
    entropy = trace[:, APGAHook.TRACE.index("entropy")]
    assert (entropy > 0).all() and (entropy <= np.log(2) + 1e-6).all()


def _output_dtypes(module: nn.Module, train_only: bool = False) -> set:
    seen = set()
    module.register_forward_hook(lambda m, i, out: seen.add(out.dtype) if m.training or not train_only else None)
    return seen


@pytest.mark.parametrize("cpu_amp", [False, True])
def test_the_agent_and_the_extra_steps_take_the_loops_precision(cpu_amp):
    """Under a bf16 fit (cpu_amp) the agent, the erased loss and the inverse-masked step run in bf16,
    as the loop's clean step does, so both reward losses share one precision; a float32 fit keeps
    them all float32, and the gallery's erase probabilities are float32 either way."""
    ds = _square_ds(12)
    agent = create_model("unet_small", 1, 1, widths=(4, 8))
    hook = APGAHook("binary-class", agent, -1.0, agent_steps=2)
    agent_dtypes = _output_dtypes(agent)
    torch.manual_seed(0)
    model = create_model("cnn", 2, 1, widths=(8, 16))
    clf_dtypes = _output_dtypes(model, train_only=True)   # clean step, erased losses, inverse step
    loader = data_mod.TensorLoader(ds["train"], 16, shuffle=True, seed=0)
    fit(model, loader, data_mod.TensorLoader(ds["val"], 64), ds.task,
        FitConfig(epochs=1, lr=1e-4, schedule="none", progress="none", channels_last=False, cpu_amp=cpu_amp),
        hooks=[hook])
    want = torch.bfloat16 if cpu_amp else torch.float32
    assert hook.autocast_enabled is cpu_amp
    assert agent_dtypes == {want}
    assert clf_dtypes == {want}   # not one train-mode pass left in float32 (evaluation is float32 by design)
    agent_dtypes.clear()
    p = hook.erase_probability(next(iter(loader))[0][:2])
    assert agent_dtypes == {torch.float32} and p.dtype == torch.float32


def test_the_faithful_group_keeps_the_reference_settings():
    sound = {"lr": 0.003, "agent_steps": 4, "mask_cell": 4, "init_erase_p": 0.2}
    assert faithful_group(sound) == {**sound, **REFERENCE_APGA}
    assert faithful_group(sound, {"lr": 1e-5})["lr"] == 1e-5
    assert faithful_group(sound, {"lr": 1e-5})["agent_steps"] == REFERENCE_APGA["agent_steps"] == 1
    ds = _square_ds(4)
    groups = dict(baseline=create_model("cnn", 2, 1, widths=(4, 8)), agent={"model": "unet_small",
                  "kwargs": {"widths": [4, 8]}}, apga=sound, end2end={}, cutout={}, gradcam={})
    faithful = make_hook("apga_faithful", ds, 0, **groups)
    assert faithful.faithful and faithful.agent_steps == 1 and faithful.mask_cell == 1 and faithful.area_cost == 0
    assert faithful.init_erase_p == 0.5 and not faithful.normalize_advantage and faithful.lr == 0.003
    apga = make_hook("apga", ds, 0, **groups)
    assert not apga.faithful and apga.agent_steps == 4 and apga.mask_cell == 4 and apga.init_erase_p == 0.2


# ---- the agent learns --------------------------------------------------------------------------------
#: The cells (4 x 4 px) that hold part of the square (rows and columns 6-9): the label-carrying region
#: at the agent's resolution.
REGION = torch.zeros(16, 16, dtype=torch.bool)
REGION[4:12, 4:12] = True
LEARN = {"agent_steps": 16, "lr": 3e-3, "mask_cell": 4, "init_erase_p": 0.2, "area_cost": 1.0}


@pytest.fixture(scope="module")
def square_task():
    """The toy set and a classifier trained on it (it reads the square)."""
    ds = _square_ds()
    torch.manual_seed(0)
    model = train_plain(create_model("cnn", 2, 1, widths=(8, 16)), ds["train"], epochs=5, batch_size=16)
    return ds, model.state_dict()


def _learn(square_task, **settings):
    """The chapter's APGA hook in the shared fit loop on the toy set (4 epochs of 3 batches);
    returns the mean erase probability inside and outside the square's cells on the val images of
    class 1, and the record of every agent update. ``min_delta=-1`` makes every epoch the best, so
    the agent read afterwards is the last one."""
    ds, weights = square_task
    torch.manual_seed(1)
    hook = APGAHook("binary-class", create_model("unet_small", 1, 1, widths=(8, 16)), fill_value(), **settings)
    torch.manual_seed(0)
    model = create_model("cnn", 2, 1, widths=(8, 16))
    model.load_state_dict(weights)
    loader = data_mod.TensorLoader(ds["train"], 16, shuffle=True, seed=0)
    fit(model, loader, data_mod.TensorLoader(ds["val"], 64), ds.task,
        FitConfig(epochs=4, lr=1e-4, schedule="none", progress="none", channels_last=False, min_delta=-1.0),
        hooks=[hook])
    split = ds["val"]
    x = split.images[split.labels == 1].float().div(255).sub(0.5).div(0.5)
    p = hook.erase_probability(x)[:, 0]
    return float(p[:, REGION].mean()), float(p[:, ~REGION].mean()), hook.unit_arrays()["agent_trace"]


def test_the_agent_learns_to_erase_the_region_that_carries_the_label(square_task):
    inside, outside, trace = _learn(square_task, **LEARN)
    assert len(trace) == 4 * 3 * LEARN["agent_steps"]
    q = len(trace) // 4
    col = {name: trace[:, i] for i, name in enumerate(APGAHook.TRACE)}
    assert inside > 0.8 and inside > outside + 0.3, (inside, outside)
    assert col["reward"][-q:].mean() > col["reward"][:q].mean() + 0.2
    assert col["entropy"][-q:].mean() < col["entropy"][:q].mean() - 0.05


def test_a_flipped_gradient_sign_learns_the_opposite(square_task):
    """The same run with the policy gradient's sign flipped: the agent avoids the square, so the
    test above fails when the update's sign is wrong."""
    inside, outside, trace = _learn(square_task, **LEARN, pg_coef=-100.0)
    assert inside < outside, (inside, outside)
    q = len(trace) // 4
    assert trace[-q:, 0].mean() < trace[:q, 0].mean()


def test_top_share_takes_the_highest_pixels_of_each_map():
    from helpers.apga.protocol import top_share

    maps = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.2, 0.2, 0.1, 0.0]]).view(2, 1, 2, 2)
    region = top_share(maps, torch.tensor([2, 1]))
    assert region.view(2, 4).tolist() == [[False, True, True, False], [True, False, False, False]]
    assert not top_share(maps, torch.tensor([0, 0])).any()
