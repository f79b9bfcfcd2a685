"""The noise chapter's phase-1 units: they keep their policy trace and policy weights when ``fit``
resumes from a finished checkpoint (a unit recomputed after its results were set aside), and their
val can be scored under the policy's unconditional masks (:class:`helpers.noise.hooks.UnconditionalValidation`)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from helpers import data as data_mod
from helpers.noise import MaskConfig, NoiseMaskHook, NoisePolicy, PolicyConfig, build_mix
from helpers.noise import protocol
from helpers.results import Recorder, unit_name
from helpers.train import FitConfig, Hook, fit

TINY = PolicyConfig(backbone="cnn", widths=[4], hidden=8)
MASKS = MaskConfig(grid=4, kernel=3, sigma=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks (conftest.py)


@pytest.fixture
def mix(tmp_path, make_npz):
    root = tmp_path / "data"
    for flag, n in (("organamnist", (44, 22, 22)), ("retinamnist", (25, 10, 10))):
        make_npz(root, flag, n=n, seed=len(flag))
    return build_mix(["organamnist", "retinamnist"], 28, root, channels=3, verify=False)


@pytest.fixture
def book(tmp_path, monkeypatch):
    monkeypatch.setenv("RLMED_BOOK", str(tmp_path / "book"))
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RLMED_PROGRESS", "none")
    return tmp_path / "book" / "results" / "noise" / "t"


def _pretrain(recorder, mix, method="policy", epochs=2, **kw):
    cfg = FitConfig(epochs=epochs, lr=1e-3, monitor="val/acc", progress="none")
    return protocol.pretrain(recorder, mix, method, 0, cfg, MASKS, TINY, model="cnn", batch_size=16, device="cpu", **kw)


def test_a_phase1_unit_recomputed_from_its_finished_checkpoint_keeps_its_trace_and_policy(mix, book):
    first = Recorder(book, scope={"k_shots": [16]})
    _pretrain(first, mix)
    keys = protocol.pretrain_keys("policy", 0)
    trace_path = book / "tables" / f"trace__{unit_name(**keys)}.csv"
    trace = pd.read_csv(trace_path)
    policy = first.load_model(**keys, role="policy")
    n_batches = -(-len(mix["train"]) // 16)
    assert len(trace) == 2 * n_batches

    # the params change in a way that does not touch this unit (e.g. the transfer's k-shots): its
    # results are set aside, but its finished checkpoint (fingerprint and code unchanged) is kept
    second = Recorder(book, scope={"k_shots": [0]})
    assert not trace_path.exists() and not second.has_unit(**keys)
    _pretrain(second, mix)
    unit = second.load_unit(**keys)
    assert unit["resumed_from"] == 2                          # restored from the checkpoint, not retrained
    again = pd.read_csv(trace_path)                           # the trace is there, whole
    pd.testing.assert_frame_equal(again, trace)
    restored = second.load_model(**keys, role="policy")       # and so is the policy, the same weights
    assert restored.keys() == policy.keys() and all(torch.equal(restored[k], policy[k]) for k in policy)
    traces = protocol.traces(second)
    assert set(traces["method"]) == {"policy"} and len(traces) == len(trace)

    # the random control reads the policy's strength from the history: it still runs on the resumed units
    _pretrain(second, mix, method="random")
    assert (book / "tables" / f"trace__{unit_name(**protocol.pretrain_keys('random', 0))}.csv").is_file()


class _BestAtFirstEpoch(Hook):
    """Logs a monitor that is best at epoch 1, so fit restores the hooks' state of epoch 1."""

    def on_epoch_end(self, epoch, logs):
        return {"val/first": 1.0 if epoch == 1 else 0.0}


def test_the_trace_is_never_rewound_to_the_best_epoch(mix, tmp_path):
    from helpers.models import create_model

    def run():
        torch.manual_seed(0)
        pol = NoisePolicy(MASKS.grid, 3, TINY.backbone, {"widths": TINY.widths}, TINY.hidden)
        hook = NoiseMaskHook(pol, MASKS, "reinforce", TINY)
        model = create_model("cnn", num_classes=mix.n_classes, in_chans=3, widths=(4,))
        tl = data_mod.TensorLoader(mix["train"], 16, shuffle=True, seed=0)
        vl = data_mod.TensorLoader(mix["val"], 64)
        cfg = FitConfig(epochs=3, monitor="val/first", progress="none")
        res = fit(model, tl, vl, mix.task, cfg, hooks=[hook, _BestAtFirstEpoch()], checkpoint=tmp_path / "c.pt")
        return res, hook, len(tl)

    res, hook, n = run()
    assert res.best_epoch == 1 and len(hook.trace) == 3 * n and hook.steps == n   # state of epoch 1, whole log
    policy_at_best = {k: v.clone() for k, v in hook.policy.state_dict().items()}
    res2, hook2, _ = run()                                    # a fresh process: resumed from the finished checkpoint
    assert res2.resumed_from == 3 and hook2.trace == hook.trace
    assert all(torch.equal(hook2.policy.state_dict()[k], v) for k, v in policy_at_best.items())


# ---- phase 1's validation under unconditional masks ----------------------------------------------
def _policy_with(run_a: float, run_b: float):
    pol = NoisePolicy(MASKS.grid, 3, TINY.backbone, {"widths": TINY.widths}, TINY.hidden)
    pol.run_a.fill_(run_a)
    pol.run_b.fill_(run_b)
    return pol


def test_unconditional_validation_masks_with_the_running_beta_the_same_draws_every_call(mix):
    from helpers.models import create_model
    from helpers.noise.hooks import UnconditionalValidation

    hook = NoiseMaskHook(_policy_with(math.log(2.0), math.log(6.0)), MASKS, "reinforce", TINY)   # Beta(2, 6): mean .25
    val = UnconditionalValidation(hook, mix.task, seed=0)
    vl = data_mod.TensorLoader(mix["val"], 64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = list(val.masked(vl))
    ratio = torch.cat([xm / x for (xm, _), (x, _) in zip(first, vl)])
    assert 0.2 < float(ratio.nanmean()) < 0.3                               # the unconditional Beta's mean, .25
    model = create_model("cnn", num_classes=mix.n_classes, in_chans=3, widths=(4,))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m1, _, _ = val(model, vl, "val")
    m2, _, _ = val(model, vl, "val")
    assert m1 == m2 and "val/loss" in m1 and "val/acc" in m1                # the same draws at every epoch
    assert torch.equal(torch.get_rng_state(), before)                        # training's random stream untouched
    from helpers.train import evaluate
    plain_m, _, _ = evaluate(model, vl, mix.task, prefix="val", criterion=torch.nn.CrossEntropyLoss(reduction="none"))
    assert plain_m["val/loss"] != pytest.approx(m1["val/loss"])              # the masks are applied
    assert "seed=0" in repr(val) and "0x" not in repr(val)                  # a stable fingerprint


def test_a_phase1_unit_can_be_validated_under_unconditional_masks(mix, book):
    rec = Recorder(book)
    m = _pretrain(rec, mix, pretrain_val="unconditional")
    keys = protocol.pretrain_keys("policy", 0)
    hist = rec.history(**keys)
    best = hist.loc[hist["epoch"] == rec.load_unit(**keys)["metrics"]["best_epoch"]].iloc[0]
    assert m["val/loss"] == pytest.approx(best["val/loss"])                  # the selected epoch's masked score
    unmasked = Recorder(book.parent / "u")
    _pretrain(unmasked, mix)
    hist0 = unmasked.history(**keys)
    assert hist0["train/loss"].tolist() == hist["train/loss"].tolist()     # the same training, bit for bit,
    assert all(a != pytest.approx(b) for a, b in zip(hist0["val/loss"], hist["val/loss"]))   # scored otherwise
    with pytest.raises(ValueError, match="pretrain_val"):
        _pretrain(rec, mix, pretrain_val="masked")
