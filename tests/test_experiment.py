"""helpers.experiment.train_and_test: the one supervised unit (keys, reuse, weights, splits)."""
from __future__ import annotations

import pytest
import torch

from helpers import data as data_mod
from helpers import experiment
from helpers.data import MedMNIST, Split
from helpers.experiment import train_and_test
from helpers.results import Recorder
from helpers.train import FitConfig
from test_train import separable

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks (conftest.py)


def dataset(test_noise: bool = False) -> MedMNIST:
    """Separable train and val; with ``test_noise`` the test labels are random (accuracy ~0.5)."""
    test = separable(64, 2)
    if test_noise:
        g = torch.Generator().manual_seed(3)
        test = Split(test.images, torch.randint(0, 2, (64,), generator=g))
    return MedMNIST("synthetic", 8, "binary-class", 1, {"0": "dark", "1": "bright"},
                    {"train": separable(128, 0), "val": separable(64, 1), "test": test})


CFG = FitConfig(epochs=3, lr=1e-2, schedule="none", monitor="val/acc", progress="none")
KW = {"widths": [8, 16]}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))


def test_selection_uses_val_and_test_is_scored_once(tmp_path):
    rec = Recorder(tmp_path / "r")
    m = train_and_test(rec, dataset(test_noise=True), "cnn", 0, CFG, batch_size=32, model_kwargs=KW)
    unit = rec.units()[0]
    history = rec.history(**unit["keys"])
    # the epoch history's val/acc is the val split's: the best epoch's equals the stored val/acc exactly
    assert history.loc[history["epoch"] == m["best_epoch"], "val/acc"].item() == m["val/acc"]
    assert m["val/acc"] > 0.9 and m["test/acc"] < 0.8  # val is learnable, test labels are noise


def test_kfold_style_units_never_touch_test(tmp_path, monkeypatch):
    seen = []
    real = data_mod.TensorLoader

    def spy(split, *a, **k):
        seen.append(split)
        return real(split, *a, **k)

    monkeypatch.setattr(experiment.data_mod, "TensorLoader", spy)
    ds = dataset()
    rec = Recorder(tmp_path / "r")
    m = train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs=KW, evaluate_on=("val",))
    assert not any(s is ds["test"] for s in seen)
    assert not any(k.startswith("test/") for k in m)
    assert "test_scores" not in rec.scores(**rec.units()[0]["keys"])
    with pytest.raises(ValueError, match="must include 'val'"):
        train_and_test(rec, ds, "cnn", 0, CFG, evaluate_on=("test",))


def test_units_differing_only_in_kwargs_or_augment_do_not_collide(tmp_path):
    rec = Recorder(tmp_path / "r")
    ds = dataset()
    train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs={"widths": [8, 16]})
    train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs={"widths": [4, 8]})
    train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs={"widths": [4, 8]}, augment={"hflip": 0.5})
    units = rec.units()
    assert len(units) == 3 and len({u["keys"]["variant"] for u in units}) == 3
    assert len({u["metrics"]["params"] for u in units}) == 2


def test_a_stored_unit_is_reused_and_other_settings_redo_it(tmp_path, monkeypatch):
    rec = Recorder(tmp_path / "r")
    ds = dataset()
    first = train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs=KW)
    monkeypatch.setattr(experiment, "fit", lambda *a, **k: pytest.fail("retrained a stored unit"))
    assert train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs=KW) == first
    monkeypatch.undo()
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    other = train_and_test(rec, ds, "cnn", 0, FitConfig(**{**CFG.__dict__, "epochs": 1}), batch_size=32,
                           model_kwargs=KW)
    assert other["epochs_run"] == 1 and len(rec.units()) == 1  # same key, redone for the new fit config


def test_a_unit_started_from_stored_weights_begins_at_those_weights(tmp_path, monkeypatch):
    rec = Recorder(tmp_path / "r")
    ds = dataset()
    train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs=KW, keep_model=True)
    keys = rec.units()[0]["keys"]
    stored = rec.load_model(**keys)
    seen = {}

    def spy_fit(model, *a, **k):
        seen.update({n: t.detach().clone() for n, t in model.state_dict().items()})
        raise KeyboardInterrupt  # stop right where training would start

    monkeypatch.setattr(experiment, "fit", spy_fit)
    with pytest.raises(KeyboardInterrupt):
        train_and_test(rec, ds, "cnn", 1, CFG, batch_size=32, model_kwargs=KW, init_from=rec.model_path(**keys))
    assert seen.keys() == stored.keys() and all(torch.equal(seen[n], stored[n]) for n in stored)
    with pytest.raises(FileNotFoundError, match="init_from"):
        monkeypatch.undo()
        train_and_test(rec, ds, "cnn", 2, CFG, model_kwargs=KW, init_from=tmp_path / "none.pt")


def test_normalisation_reaches_the_loaders(tmp_path, monkeypatch):
    seen = []
    real = data_mod.TensorLoader
    monkeypatch.setattr(experiment.data_mod, "TensorLoader",
                        lambda split, *a, **k: seen.append((k.get("mean"), k.get("std"))) or real(split, *a, **k))
    train_and_test(Recorder(tmp_path / "r"), dataset(), "cnn", 0, CFG, batch_size=32, model_kwargs=KW,
                   normalize=(0.2, 0.3))
    assert seen and set(seen) == {(0.2, 0.3)}


def _interrupted_unit(tmp_path, monkeypatch):
    """A unit whose ``fit`` trained and checkpointed, then the process died before the unit was
    recorded; returns the dataset, the recorder and the checkpoints left, with ``fit`` restored."""
    ds, rec, real = dataset(), Recorder(tmp_path / "r"), experiment.fit

    def crash(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "fit", crash)
    with pytest.raises(KeyboardInterrupt):
        train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs=KW)
    monkeypatch.setattr(experiment, "fit", real)
    return ds, rec, sorted((tmp_path / "cache").rglob("*.pt"))


def test_a_checkpoint_resumes_an_interrupted_unit(tmp_path, monkeypatch):
    ds, rec, ckpts = _interrupted_unit(tmp_path, monkeypatch)
    assert len(ckpts) == 1 and load_finished(ckpts[0]) and not rec.units()
    assert ckpts[0].parent == experiment.checkpoint_dir(rec.root)
    train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs=KW)
    assert rec.load_unit(**rec.units()[0]["keys"])["resumed_from"] == CFG.epochs   # not trained again
    assert sorted((tmp_path / "cache").rglob("*.pt")) == ckpts   # kept: it restores a set-aside unit


def test_a_checkpoint_left_by_other_code_is_not_resumed(tmp_path, monkeypatch):
    ds, rec, old = _interrupted_unit(tmp_path, monkeypatch)
    monkeypatch.setattr(experiment, "unit_code_digest", lambda *a, **k: "edited code")
    m = train_and_test(rec, ds, "cnn", 0, CFG, batch_size=32, model_kwargs=KW)   # redone from scratch
    assert rec.load_unit(**rec.units()[0]["keys"])["resumed_from"] is None and m["epochs_run"] == CFG.epochs
    now = sorted((tmp_path / "cache").rglob("*.pt"))   # the other code's checkpoint is deleted, the new one kept
    assert len(old) == len(now) == 1 and old != now and load_finished(now[0])


def load_finished(path) -> bool:
    from helpers.train import load_checkpoint
    return bool(load_checkpoint(path).get("finished"))
