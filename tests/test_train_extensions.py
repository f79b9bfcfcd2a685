"""helpers.train extension points: per-batch hooks, best-epoch hook state, criterion, param groups,
validate, CUDA-safe resume state, weights_only checkpoints, the NaN monitor, eval mode, plateau mode."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers.data import TensorLoader
from helpers.train import FitConfig, Hook, NonFiniteLossError, fit, load_checkpoint, make_criterion
from helpers.train import make_scheduler, predict
from test_train import BINARY, cfg, loaders, model_for, splits, state_equal  # noqa: F401  (splits: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks (conftest.py)


class BatchSpy(Hook):
    def __init__(self):
        self.calls, self.started = [], None

    def on_fit_start(self, model, optimizer, device):
        self.started = (model, optimizer, device)

    def on_batch_end(self, x, y, logits, loss_per_sample):
        assert not loss_per_sample.requires_grad and loss_per_sample.shape == (len(y),)
        assert logits.shape == (len(y), 2)
        self.calls.append((len(y), loss_per_sample.clone()))


def test_on_batch_end_sees_per_sample_losses_that_average_to_the_logged_loss(splits):
    spy = BatchSpy()
    res = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=1), hooks=[spy])
    assert spy.started is not None and isinstance(spy.started[1], torch.optim.Optimizer)
    n = sum(k for k, _ in spy.calls)
    assert n == len(splits[0]) and len(spy.calls) == math.ceil(len(splits[0]) / 32)
    mean = sum(float(p.sum()) for _, p in spy.calls) / n
    assert mean == pytest.approx(res.history["train/loss"].iloc[0], rel=1e-5)
    assert len({round(float(p.std()), 6) for _, p in spy.calls}) > 1  # really per sample, not a broadcast mean


class Counter(Hook):
    """A hook whose state is the epoch it was last updated at (an agent or a policy, in a method)."""

    def __init__(self):
        self.value = torch.zeros(1)

    def on_epoch_end(self, epoch, logs):
        self.value = torch.tensor([float(epoch)])
        return {"custom/score": [0.1, 0.9, 0.2, 0.3][epoch - 1]}

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"].clone()


def test_hook_state_at_the_best_epoch_is_restored(splits, tmp_path):
    hook = Counter()
    res = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=4, monitor="custom/score"), hooks=[hook],
              checkpoint=tmp_path / "ck.pt")
    assert res.best_epoch == 2 and hook.value.item() == 2.0
    # and the finished checkpoint gives the same back
    again = Counter()
    fit(model_for(), *loaders(splits), BINARY, cfg(epochs=4, monitor="custom/score"), hooks=[again],
        checkpoint=tmp_path / "ck.pt")
    assert again.value.item() == 2.0


def test_weighted_criterion_reduction_equals_torch_mean():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)
    w = torch.tensor([0.5, 2.0, 1.0])
    for ls in (0.0, 0.2):
        crit = make_criterion("multi-class", w, ls)
        ref = nn.CrossEntropyLoss(weight=w, label_smoothing=ls)(logits, y)
        assert torch.allclose(crit.reduce(crit(logits, y), y), ref, atol=1e-6)
    crit = make_criterion("multi-label, binary-class")
    t = (torch.rand(50, 3, generator=g) < 0.5).float()
    assert torch.allclose(crit.reduce(crit(logits, t), t), nn.BCEWithLogitsLoss()(logits, t), atol=1e-6)


def test_custom_criterion_and_scalar_criterion_refused(splits):
    seen = []

    def focal(logits, y):
        per = nn.functional.cross_entropy(logits, y, reduction="none")
        seen.append(per.shape)
        return per * 2.0

    res = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=1), criterion=focal)
    ref = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=1))
    assert seen and seen[0] == (32,)
    assert res.history["train/loss"].iloc[0] == pytest.approx(2 * ref.history["train/loss"].iloc[0], rel=0.05)
    with pytest.raises(ValueError, match="per-sample"):
        fit(model_for(), *loaders(splits), BINARY, cfg(epochs=1), criterion=nn.CrossEntropyLoss())


def test_param_groups_keep_their_own_lr(splits):
    model = model_for()
    head = list(model.parameters())[-2:]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    frozen = [p.detach().clone() for p in body]
    res = fit(model, *loaders(splits), BINARY, cfg(epochs=1, lr=1e-2),
              param_groups=[{"params": body, "lr": 0.0}, {"params": head}])
    assert all(torch.equal(a, b.detach()) for a, b in zip(frozen, body))  # lr 0: unchanged
    assert res.history["lr"].iloc[0] == 0.0


def test_validate_callable_replaces_classification_eval(splits):
    calls = []

    def validate(model):
        calls.append(model.training)
        return {"val/neg_l2": -float(sum((p.detach() ** 2).sum() for p in model.parameters()))}

    res = fit(model_for(), loaders(splits)[0], None, BINARY, cfg(epochs=2, monitor="val/neg_l2"), validate=validate)
    assert len(calls) == 2 and "val/acc" not in res.history and res.best_epoch in (1, 2)


def test_a_monitor_nan_at_every_epoch_raises(splits):
    class NaNScore(Hook):
        def on_epoch_end(self, epoch, logs):
            return {"custom/score": float("nan")}

    with pytest.raises(NonFiniteLossError, match="custom/score.*NaN at every"):
        fit(model_for(), *loaders(splits), BINARY, cfg(epochs=2, monitor="custom/score"), hooks=[NaNScore()])


def test_checkpoints_load_without_unpickling(splits, tmp_path):
    fit(model_for(), *loaders(splits), BINARY, cfg(epochs=1), checkpoint=tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)  # raises if anything needs unpickling
    assert state["finished"] and isinstance(state["history"][0]["val/acc"], float)
    assert set(state["rng"]) >= {"cpu"}
    assert load_checkpoint(tmp_path / "ck.pt")["epoch"] == 1


def test_no_torch_load_unpickles_anywhere_in_the_package():
    from pathlib import Path
    import re
    root = Path(__file__).resolve().parents[1] / "helpers"
    offenders = []
    for src in root.rglob("*.py"):
        for i, line in enumerate(src.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{src.name}:{i}")
            if re.search(r"weights_only\s*=\s*False", line):
                offenders.append(f"{src.name}:{i}")
    assert not offenders, offenders


def test_predict_uses_eval_mode(splits):
    """Dropout and BatchNorm must be in eval mode: two predictions of a model with dropout agree."""
    model = model_for(dropout=0.9)
    model.train()
    val = TensorLoader(splits[1], 64)
    a, _, _ = predict(model, val, BINARY)
    b, _, _ = predict(model, val, BINARY)
    assert np.array_equal(a, b) and not model.training


def test_plateau_schedule_follows_the_monitor_direction():
    for monitor, mode in (("val/auc", "max"), ("val/loss", "min")):
        p = nn.Parameter(torch.zeros(1))
        c = FitConfig(schedule="plateau", monitor=monitor, plateau_patience=0, plateau_factor=0.5)
        opt = torch.optim.SGD([p], lr=1.0)
        sched, per_batch = make_scheduler(opt, c, 1)
        assert not per_batch and sched.mode == mode
        better = [0.5, 0.6, 0.7] if mode == "max" else [0.7, 0.6, 0.5]
        for s in better:  # an improving monitor never lowers the LR
            sched.step(s)
        assert opt.param_groups[0]["lr"] == 1.0
        sched.step(better[0])  # worse
        assert opt.param_groups[0]["lr"] == 0.5
