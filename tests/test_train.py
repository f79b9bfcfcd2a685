"""helpers.train: fit on a tiny separable problem, selection, early stopping, schedules, NaN, resume."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers.config import ParamsError
from helpers.data import Split, TensorLoader
from helpers.augment import make_augment
from helpers.models import create_model
from helpers.repro import seed_everything
from helpers.train import (
    EarlyStopping,
    FitConfig,
    Hook,
    NonFiniteLossError,
    evaluate,
    fit,
    load_checkpoint,
    make_criterion,
)

SIZE = 8
BINARY = "binary-class"
MULTI_LABEL = "multi-label, binary-class"


def separable(n: int, seed: int) -> Split:
    """Class = whether the image is bright (mean intensity above or below the middle)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    labels = labels[torch.randperm(n, generator=g)]
    low = torch.randint(0, 110, (n, 1, SIZE, SIZE), generator=g)
    high = torch.randint(145, 256, (n, 1, SIZE, SIZE), generator=g)
    images = torch.where(labels.view(-1, 1, 1, 1).bool(), high, low).to(torch.uint8)
    return Split(images, labels)


def multilabel(n: int, seed: int) -> Split:
    """Two labels: bright top half, bright left half."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 2, generator=g) < 0.5).float()
    img = torch.randint(0, 80, (n, 1, SIZE, SIZE), generator=g)
    img[:, :, : SIZE // 2, :] += (y[:, 0] * 80).long().view(-1, 1, 1, 1)
    img[:, :, :, : SIZE // 2] += (y[:, 1] * 80).long().view(-1, 1, 1, 1)
    return Split(img.clamp(max=255).to(torch.uint8), y)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks (conftest.py)


@pytest.fixture(scope="module")
def splits():
    return separable(128, 0), separable(64, 1)


def model_for(n_out=2, seed=0, dropout=0.0):
    seed_everything(seed)
    return create_model("cnn", num_classes=n_out, in_chans=1, widths=(8, 16), dropout=dropout)


def loaders(splits, seed=0, augment=None, batch=32):
    train, val = splits
    return (TensorLoader(train, batch, shuffle=True, seed=seed, augment=augment),
            TensorLoader(val, 64))


def cfg(**kw):
    base = dict(epochs=4, lr=3e-3, schedule="none", monitor="val/acc", progress="none")
    base.update(kw)
    return FitConfig(**base)


def state_equal(a: dict, b: dict) -> bool:
    """Bit-for-bit equal state dicts (resume and reuse are exact, not approximate)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class ScriptedScore(Hook):
    """Logs ``custom/score`` from a list and snapshots the weights at every epoch end."""

    def __init__(self, scores, model=None, key="custom/score"):
        self.scores, self.model, self.key, self.snapshots = list(scores), model, key, {}

    def on_epoch_end(self, epoch, logs):
        if self.model is not None:
            self.snapshots[epoch] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {self.key: self.scores[min(epoch, len(self.scores)) - 1]}


# ---- learning and selection -------------------------------------------------------------------
def test_fit_learns_separable_problem(splits):
    model = model_for()
    tl, vl = loaders(splits)
    res = fit(model, tl, vl, BINARY, cfg(epochs=5))
    h = res.history
    assert list(h["epoch"]) == [1, 2, 3, 4, 5]
    assert h["train/loss"].iloc[-1] < 0.5 * h["train/loss"].iloc[0]
    assert h["val/acc"].max() >= 0.95
    for col in ("lr", "train/loss", "train/acc", "val/acc", "val/auc", "val/loss", "time_s"):
        assert col in h
    # best epoch is the first epoch with the highest monitor, and the score is its value
    assert res.best_epoch == int(h["epoch"][h["val/acc"].idxmax()])
    assert res.best_score == pytest.approx(h["val/acc"].max())
    assert res.resumed_from is None and not res.stopped_early
    # the returned model scores the best epoch's value
    metrics, _, _ = evaluate(res.model, vl, BINARY, channels_last=True)
    assert metrics["val/acc"] == pytest.approx(res.best_score)


@pytest.mark.parametrize("monitor,scores,best", [
    ("custom/score", [0.2, 0.9, 0.4, 0.5], 2),
    ("custom/loss", [0.5, 0.4, 0.1, 0.3], 3),  # a loss is minimised (mode auto)
])
def test_best_epoch_weights_are_returned(splits, monitor, scores, best):
    model = model_for()
    hook = ScriptedScore(scores, model, key=monitor)
    tl, vl = loaders(splits)
    res = fit(model, tl, vl, BINARY, cfg(monitor=monitor), hooks=[hook])
    assert res.best_epoch == best
    assert res.best_score == scores[best - 1]
    assert len(res.history) == 4
    final = res.model.state_dict()
    assert state_equal(final, hook.snapshots[best])
    assert not state_equal(final, hook.snapshots[4])  # not simply the last epoch


# ---- early stopping ------------------------------------------------------------------------
def test_early_stopping_unit():
    es = EarlyStopping(patience=2, min_delta=0.1, min_epochs=1, maximize=True)
    assert es.step(0.5, 1) and es.best_epoch == 1
    assert not es.step(0.55, 2)            # within min_delta: not better
    assert es.bad_epochs == 1 and not es.stop_now(2)
    assert es.step(0.7, 3)                 # better by more than min_delta: resets
    assert es.bad_epochs == 0 and es.best == 0.7
    assert not es.step(float("nan"), 4)    # NaN is never better
    assert not es.step(0.7, 5)
    assert es.should_stop and es.stop_now(5)

    late = EarlyStopping(patience=1, min_epochs=4, maximize=True)
    late.step(1.0, 1)
    late.step(0.5, 2)
    assert late.should_stop and not late.stop_now(2) and not late.stop_now(3) and late.stop_now(4)

    lower = EarlyStopping(patience=3, min_delta=0.01, maximize=False)
    assert lower.step(1.0, 1) and not lower.step(0.995, 2) and lower.step(0.98, 3)

    off = EarlyStopping(patience=None)
    for e in range(1, 20):
        off.step(0.0, e)
    assert not off.should_stop and not off.stop_now(19)

    restored = EarlyStopping(patience=2)
    restored.load_state_dict(es.state_dict())
    assert (restored.best, restored.best_epoch, restored.bad_epochs) == (0.7, 3, 2)


@pytest.mark.parametrize("patience,min_epochs,expected_stop", [(2, 1, 3), (2, 5, 5), (3, 2, 4)])
def test_fit_stops_when_monitor_cannot_improve(splits, patience, min_epochs, expected_stop):
    """A constant monitor: epoch 1 is the best, then ``patience`` bad epochs; never before min_epochs.

    So the fit stops at ``max(min_epochs, 1 + patience)``.
    """
    model = model_for()
    tl, vl = loaders(splits)
    res = fit(model, tl, vl, BINARY, cfg(epochs=10, monitor="custom/score", patience=patience,
                                         min_epochs=min_epochs), hooks=[ScriptedScore([0.5])])
    assert len(res.history) == expected_stop == max(min_epochs, 1 + patience)
    assert res.stopped_early
    assert res.best_epoch == 1


def test_fit_min_delta(splits):
    # tiny gains below min_delta do not count
    scores = [0.5, 0.505, 0.51, 0.515, 0.52, 0.525]
    model = model_for()
    tl, vl = loaders(splits)
    res = fit(model, tl, vl, BINARY, cfg(epochs=6, monitor="custom/score", patience=2, min_delta=0.02),
              hooks=[ScriptedScore(scores)])
    assert len(res.history) == 3 and res.best_epoch == 1 and res.stopped_early
    res = fit(model_for(), *loaders(splits), BINARY,
              cfg(epochs=6, monitor="custom/score", patience=2, min_delta=0.0), hooks=[ScriptedScore(scores)])
    assert len(res.history) == 6 and res.best_epoch == 6 and not res.stopped_early


def test_stop_on_last_epoch_is_not_early(splits):
    res = fit(model_for(), *loaders(splits), BINARY,
              cfg(epochs=3, monitor="custom/score", patience=2), hooks=[ScriptedScore([0.5])])
    assert len(res.history) == 3 and not res.stopped_early


# ---- optimisers and schedules -------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["none", "onecycle", "cosine", "plateau"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_schedules_and_optimizers(splits, schedule, optimizer):
    lr = 0.05 if optimizer == "sgd" else 1e-2
    c = cfg(epochs=5, lr=lr, optimizer=optimizer, schedule=schedule, monitor="custom/score",
            plateau_patience=1, plateau_factor=0.1)
    res = fit(model_for(), *loaders(splits), BINARY, c, hooks=[ScriptedScore([0.5])])
    h = res.history
    lrs = h["lr"].to_numpy()
    assert h["train/loss"].iloc[-1] < h["train/loss"].iloc[0]
    assert h["val/acc"].iloc[-1] >= 0.9
    if schedule == "none":
        assert np.allclose(lrs, lr)
    elif schedule == "cosine":
        assert lrs[0] == pytest.approx(lr) and np.all(np.diff(lrs) < 0)
    elif schedule == "onecycle":
        assert lrs[0] == pytest.approx(lr / 10)
        assert lrs.max() > lrs[0] and lrs.max() > lrs[-1]
    else:  # plateau: constant monitor -> one bad epoch allowed, the lr drops by 10x after the third
        assert np.allclose(lrs[:3], lr) and lrs[3] == pytest.approx(lr * 0.1)


def test_grad_clip_logs_and_bounds_the_step(splits):
    train, val = splits
    model = model_for()
    before = [p.detach().clone() for p in model.parameters()]
    one_batch = TensorLoader(train, len(train), shuffle=True)
    c = cfg(epochs=1, lr=1.0, optimizer="sgd", momentum=0.0, weight_decay=0.0, grad_clip=1e-3)
    res = fit(model, one_batch, TensorLoader(val, 64), BINARY, c)
    assert res.history["train/grad_norm"].iloc[0] > 1e-3  # the norm before clipping
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < step.item() <= 1e-3 * 1.001  # one SGD step of lr 1 on a clipped gradient
    res = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=1))
    assert "train/grad_norm" not in res.history


# ---- non-finite loss -------------------------------------------------------------------------
class NaNAfter(Hook):
    def __init__(self, after_epoch):
        self.after, self.done = after_epoch, 0

    def transform_batch(self, x, y, model):
        return (x * float("nan"), y) if self.done >= self.after else (x, y)

    def on_epoch_end(self, epoch, logs):
        self.done = epoch


def test_nan_loss_raises_and_keeps_checkpoint(splits, tmp_path):
    ckpt = tmp_path / "ck.pt"
    c = cfg(epochs=3)
    with pytest.raises(NonFiniteLossError) as err:
        fit(model_for(), *loaders(splits), BINARY, c, checkpoint=ckpt, hooks=[NaNAfter(1)])
    msg = str(err.value)
    assert "epoch 2" in msg and "Fix:" in msg and "grad_clip" in msg and "lr" in msg
    assert isinstance(err.value, FloatingPointError)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and not state["finished"]
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
    # the run continues from the last good epoch once the cause is gone
    res = fit(model_for(seed=5), *loaders(splits), BINARY, c, checkpoint=ckpt, hooks=[NaNAfter(99)])
    assert res.resumed_from == 1 and len(res.history) == 3


# ---- resume ---------------------------------------------------------------------------------
class InterruptAt(Hook):
    """Raises KeyboardInterrupt at the given batch of the given epoch (like Ctrl-C)."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch, self.done, self.seen = epoch, batch, 0, 0

    def transform_batch(self, x, y, model):
        if self.done == self.epoch - 1:
            if self.seen == self.batch:
                raise KeyboardInterrupt
            self.seen += 1
        return x, y

    def on_epoch_end(self, epoch, logs):
        self.done = epoch


def _history(res):
    return res.history.drop(columns=["time_s"])


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_resume_equals_uninterrupted_run(splits, tmp_path, schedule):
    aug = {"hflip": 0.5, "rotate": 10, "erase": 0.3}
    c = cfg(epochs=6, schedule=schedule, monitor="val/loss", plateau_patience=0)

    def run(ckpt, seed, hooks=()):
        model = model_for(seed=seed, dropout=0.3)  # dropout draws from the global RNG
        tl, vl = loaders(splits, seed=seed, augment=make_augment(aug))  # augment from the loader's
        return fit(model, tl, vl, BINARY, c, checkpoint=ckpt, hooks=hooks)

    ref = run(tmp_path / "ref.pt", seed=0)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, seed=0, hooks=[InterruptAt(epoch=4, batch=2)])
    assert load_checkpoint(ckpt)["epoch"] == 3
    # a new process would start from other seeds: the checkpoint must restore every RNG
    res = run(ckpt, seed=123)
    assert res.resumed_from == 3
    pd.testing.assert_frame_equal(_history(res), _history(ref), check_exact=True)
    assert res.best_epoch == ref.best_epoch
    assert state_equal(res.model.state_dict(), ref.model.state_dict())
    last_ref = load_checkpoint(tmp_path / "ref.pt")
    last = load_checkpoint(ckpt)
    assert last["finished"] and last["epoch"] == 6
    assert state_equal(last["model"], last_ref["model"])


def test_finished_checkpoint_returns_without_training(splits, tmp_path):
    ckpt = tmp_path / "ck.pt"
    c = cfg(epochs=3)
    first = fit(model_for(), *loaders(splits), BINARY, c, checkpoint=ckpt)
    mtime = ckpt.stat().st_mtime_ns

    class NoTraining(Hook):
        def transform_batch(self, x, y, model):
            raise AssertionError("trained although the checkpoint is finished")

    again = fit(model_for(seed=9), *loaders(splits), BINARY, c, checkpoint=ckpt, hooks=[NoTraining()])
    assert again.resumed_from == 3 and again.best_epoch == first.best_epoch
    pd.testing.assert_frame_equal(again.history, first.history)
    assert state_equal(again.model.state_dict(), first.model.state_dict())
    assert ckpt.stat().st_mtime_ns == mtime


def test_checkpoint_of_other_config_starts_afresh(splits, tmp_path, capsys):
    ckpt = tmp_path / "ck.pt"
    fit(model_for(), *loaders(splits), BINARY, cfg(epochs=2), checkpoint=ckpt)
    res = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=2, lr=1e-3), checkpoint=ckpt)
    assert res.resumed_from is None and len(res.history) == 2
    assert "another config" in capsys.readouterr().out


# ---- tasks and losses -------------------------------------------------------------------------
def test_multilabel_uses_bce():
    crit = make_criterion(MULTI_LABEL)
    assert isinstance(crit.loss, nn.BCEWithLogitsLoss)
    assert isinstance(make_criterion(BINARY).loss, nn.CrossEntropyLoss)
    assert isinstance(make_criterion("ordinal-regression").loss, nn.CrossEntropyLoss)
    w = torch.tensor([1.0, 3.0])
    assert torch.equal(make_criterion("multi-class", w).loss.weight, w)
    train, val = multilabel(128, 0), multilabel(64, 1)
    model = model_for(n_out=2)
    res = fit(model, TensorLoader(train, 32, shuffle=True), TensorLoader(val, 64), MULTI_LABEL,
              cfg(epochs=6, lr=1e-2, monitor="val/auc"))
    h = res.history
    assert h["train/loss"].iloc[-1] < h["train/loss"].iloc[0]
    assert h["val/auc"].max() > 0.9
    assert "train/acc" not in h  # no meaningless 0 accuracy for multi-label targets


def test_class_weights_reach_the_loss(splits):
    train, val = splits
    # class 1 weighs nothing: the model only learns to say "class 0"
    res = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=3, lr=1e-2),
              class_weights=torch.tensor([1.0, 0.0]))
    _, scores, _ = evaluate(res.model, TensorLoader(val, 64), BINARY)
    assert (scores.argmax(1) == 0).mean() > 0.9
    # with balanced weights the same model learns both classes
    res = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=3, lr=1e-2),
              class_weights=torch.tensor([1.0, 1.0]))
    assert res.best_score >= 0.95


def test_label_smoothing_raises_the_floor_of_the_loss(splits):
    sharp = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=4, lr=1e-2))
    smooth = fit(model_for(), *loaders(splits), BINARY, cfg(epochs=4, lr=1e-2, label_smoothing=0.4))
    # with smoothing 0.4 over 2 classes the smallest possible CE is the entropy of (0.8, 0.2)
    floor = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert smooth.history["train/loss"].iloc[-1] >= floor - 1e-4
    assert sharp.history["train/loss"].iloc[-1] < floor


# ---- config --------------------------------------------------------------------------------
def test_fit_config_from_params():
    c = FitConfig.from_params({"epochs": 3, "lr": 0.1}, schedule="plateau")
    assert (c.epochs, c.lr, c.schedule) == (3, 0.1, "plateau")
    with pytest.raises(ParamsError, match="ephocs.*epochs"):
        FitConfig.from_params({"ephocs": 3})
    with pytest.raises(ParamsError, match="adam"):
        FitConfig.from_params({"optimizer": "adam"})
    with pytest.raises(ParamsError, match="step"):
        FitConfig.from_params({"schedule": "step"})
    assert FitConfig(monitor="val/loss").maximize is False
    assert FitConfig(monitor="val/auc").maximize is True
    assert FitConfig(monitor="val/loss", mode="max").maximize is True


def test_unknown_monitor_is_refused(splits):
    with pytest.raises(ParamsError, match="val/auroc"):
        fit(model_for(), *loaders(splits), BINARY, cfg(epochs=1, monitor="val/auroc"))


class _DtypeProbe(Hook):
    """Records the dtype of the model's logits in training (``on_batch_end``)."""

    def __init__(self):
        self.train_dtypes = set()

    def on_batch_end(self, x, y, logits, loss_per_sample):
        self.train_dtypes.add(logits.dtype)


@pytest.mark.parametrize("cpu_amp,expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_cpu_amp_runs_the_training_forward_in_bf16_and_evaluates_in_fp32(splits, cpu_amp, expected):
    probe = _DtypeProbe()
    model = model_for()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    res = fit(model, *loaders(splits), BINARY, cfg(epochs=3, cpu_amp=cpu_amp), hooks=[probe])
    assert probe.train_dtypes == {expected}
    assert {d for training, d in seen if not training} == {torch.float32}   # selection is scored in fp32
    assert res.history["val/acc"].max() >= 0.95                          # and it learns either way
    assert res.history["train/loss"].iloc[-1] < res.history["train/loss"].iloc[0]


def test_cpu_amp_is_a_checked_fit_field():
    assert FitConfig.from_params({"cpu_amp": True}).cpu_amp is True
    with pytest.raises(ParamsError, match="cpu_amp"):
        FitConfig.from_params({"cpu_amp": "yes"})
