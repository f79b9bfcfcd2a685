"""Checkpoint weight averaging in the noise chapter (:class:`helpers.noise.WeightAveraging`): the
final weights are the mean of the last epochs' weights, through ``fit``'s hooks, also across a resume."""
from __future__ import annotations

import pytest
import torch

from helpers import data as data_mod
from helpers.models import create_model
from helpers.noise import WeightAveraging, protocol
from helpers.noise.hooks import averaging_config
from helpers.results import Recorder
from helpers.train import FitConfig, Hook, fit


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks (conftest.py)


@pytest.fixture
def ds(tmp_path, make_npz):
    make_npz(tmp_path / "data", "pneumoniamnist", n=(48, 16, 16), seed=3)
    return data_mod.load("pneumoniamnist", 28, tmp_path / "data", verify=False)


class _Snapshots(Hook):
    """Keeps a copy of the model's weights at the end of every epoch (runs before the averaging hook);
    ``fail_at`` raises there instead, before the epoch's checkpoint: an interrupted fit."""

    def __init__(self, fail_at: int | None = None):
        self.by_epoch, self.fail_at, self.model = {}, fail_at, None

    def on_fit_start(self, model, optimizer, device):
        self.model = model

    def on_epoch_end(self, epoch, logs):
        if epoch == self.fail_at:
            raise KeyboardInterrupt
        self.by_epoch[epoch] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _fit(ds, ckpt, last=3, epochs=4, fail_at=None):
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=ds.n_classes, in_chans=1, widths=(4,))
    snaps, avg = _Snapshots(fail_at), WeightAveraging(last, epochs)
    cfg = averaging_config(FitConfig(epochs=epochs, lr=0.05, optimizer="sgd", monitor="val/acc", progress="none"), last)
    tl = data_mod.TensorLoader(ds["train"], 8, shuffle=True, seed=0)
    vl = data_mod.TensorLoader(ds["val"], 64)
    res = fit(model, tl, vl, ds.task, cfg, hooks=[snaps, avg], checkpoint=ckpt)
    return res, snaps


def test_the_final_weights_are_the_mean_of_the_last_epochs_weights(ds, tmp_path):
    res, snaps = _fit(ds, tmp_path / "a.pt")
    final = res.model.state_dict()
    kept = [snaps.by_epoch[e] for e in (2, 3, 4)]           # the last 3 of 4 epochs
    for k, v in final.items():
        if v.is_floating_point():
            assert torch.allclose(v, torch.stack([s[k] for s in kept]).mean(0), atol=1e-6), k
        else:                                                # BatchNorm's counter: the final epoch's
            assert torch.equal(v, snaps.by_epoch[4][k])
    assert not torch.equal(kept[0]["head.weight"], kept[2]["head.weight"])      # the epochs did differ,
    assert not torch.allclose(final["head.weight"], kept[2]["head.weight"])     # so the mean is no snapshot
    assert not torch.allclose(final["head.weight"], torch.stack([s["head.weight"] for s in snaps.by_epoch.values()]).mean(0))
    assert res.best_epoch == 4 and res.history["avg/n_averaged"].tolist() == [0, 1, 2, 3]

    # a finished fit returns the averaged weights from its checkpoint, without training
    again, _ = _fit(ds, tmp_path / "a.pt")
    assert again.resumed_from == 4
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in final.items())


def test_an_interrupted_fit_resumes_its_running_average(ds, tmp_path):
    whole, _ = _fit(ds, tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):
        _fit(ds, tmp_path / "cut.pt", fail_at=4)             # epochs 1-3 checkpointed, 2 and 3 summed
    res, snaps = _fit(ds, tmp_path / "cut.pt")
    assert res.resumed_from == 3 and sorted(snaps.by_epoch) == [4]
    for k, v in whole.model.state_dict().items():
        assert torch.allclose(res.model.state_dict()[k], v, atol=1e-6), k


def test_more_epochs_to_average_than_trained_averages_them_all(ds, tmp_path):
    res, snaps = _fit(ds, tmp_path / "b.pt", last=5, epochs=2)
    mean = torch.stack([snaps.by_epoch[e]["head.weight"] for e in (1, 2)]).mean(0)
    assert torch.allclose(res.model.state_dict()["head.weight"], mean, atol=1e-6)
    with pytest.raises(ValueError):
        WeightAveraging(0, 3)


def test_the_plain_control_is_averaged_only_when_asked(ds, tmp_path, monkeypatch):
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    rec = Recorder(tmp_path / "book" / "results" / "noise" / "t")
    cfg = FitConfig(epochs=3, lr=0.05, monitor="val/acc", progress="none")
    m = protocol.plain(rec, ds, 0, cfg, model="cnn", batch_size=16, device="cpu", average_last=2)
    hist = rec.history(stage="finetune", method="plain", seed=0)
    assert m["best_epoch"] == 3 and hist["avg/n_averaged"].tolist() == [0, 1, 2]
    rec2 = Recorder(tmp_path / "book" / "results" / "noise" / "u")
    protocol.plain(rec2, ds, 0, cfg, model="cnn", batch_size=16, device="cpu")
    assert "avg/n_averaged" not in rec2.history(stage="finetune", method="plain", seed=0)
