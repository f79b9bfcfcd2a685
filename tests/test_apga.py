"""Tests of the APGA chapter's helpers (helpers/apga, helpers/models/unet.py)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from helpers import data as data_mod
from helpers.apga import (APGAHook, CutoutHook, EndToEndHook, GradCAMHook, RepeatHook, agent_loss, check_equal_looks,
                          erase, fill_value, gradcam_maps, keep_only, kshot, overlap, sample_mask)
from helpers.apga.protocol import check_protocol, comparisons, outcome, outcome_sentence
from helpers.config import ParamsError
from helpers.models import create_model, is_dense
from helpers.train import FitConfig, fit
from toys import square_ds as _toy_ds
from toys import train_plain


# ---- k-shot ----------------------------------------------------------------------------------
def test_kshot_is_balanced_seeded_and_from_train_only():
    ds = _toy_ds()
    a, b, c = kshot(ds, 5, seed=0), kshot(ds, 5, seed=0), kshot(ds, 5, seed=1)
    assert torch.bincount(a["train"].labels).tolist() == [5, 5]
    assert torch.equal(a["train"].index, b["train"].index)          # seeded
    assert not torch.equal(a["train"].index, c["train"].index)      # another seed, another draw
    assert set(a["train"].index.tolist()) <= set(ds["train"].index.tolist())
    assert a["val"] is ds["val"] and a["test"] is ds["test"]        # val and test untouched
    assert kshot(ds, None, 0) is ds


def test_kshot_refuses_k_above_a_class_count():
    with pytest.raises(ValueError, match="fewer than k=13"):
        kshot(_toy_ds(), 13, seed=0)


# ---- masks -------------------------------------------------------------------------------------
def test_masks_are_applied_and_inverted():
    x = torch.randn(2, 1, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, :2] = 1
    fill = fill_value(0.5, 0.5)
    assert fill == -1.0
    e, k = erase(x, m, fill), keep_only(x, m, fill)
    assert torch.all(e[:, :, :2] == fill) and torch.equal(e[:, :, 2:], x[:, :, 2:])
    assert torch.all(k[:, :, 2:] == fill) and torch.equal(k[:, :, :2], x[:, :, :2])
    assert torch.allclose(e + k, x + fill)                          # each pixel is in exactly one of them
    with pytest.raises(ValueError, match="does not match"):
        erase(x, m[:, :, :3], fill)


def test_overlap_is_iou():
    a = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    b = a.clone()
    a[..., 0, :] = True
    b[..., :, 0] = True
    assert overlap(a, b).item() == pytest.approx(1 / 3)
    assert overlap(a, a).item() == 1.0


# ---- the agent's policy ------------------------------------------------------------------------
def test_agent_gradient_flows_only_through_log_probs_of_sampled_actions():
    torch.manual_seed(0)
    z = torch.randn(3, 1, 4, 4, requires_grad=True)
    action, log_prob, _ = sample_mask(z)
    assert not action.requires_grad and set(action.unique().tolist()) <= {0.0, 1.0}
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss = agent_loss(z, log_prob, adv, pg_coef=1.0, erase_coef=0.0, keep_coef=0.0)
    loss.backward()
    # score function: d/dz [-A * mean_pixels(log pi(a))] / B = -A * (a - sigmoid(z)) / (pixels * B)
    expected = -adv.view(3, 1, 1, 1) * (action - torch.sigmoid(z.detach())) / (16 * 3)
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_zero_advantage_gives_no_gradient_and_greedy_is_the_threshold():
    z = torch.randn(2, 1, 3, 3, requires_grad=True)
    action, log_prob, _ = sample_mask(z, greedy=True)
    assert torch.equal(action, (torch.sigmoid(z) > 0.5).float())
    agent_loss(z, log_prob, torch.zeros(2)).backward()           # area penalties scale with |A| too
    assert torch.count_nonzero(z.grad) == 0


def test_area_penalty_pulls_towards_keeping():
    z = torch.zeros(1, 1, 2, 2, requires_grad=True)
    _, log_prob, _ = sample_mask(z)
    agent_loss(z, log_prob.detach(), torch.ones(1), pg_coef=0.0, erase_coef=1.0, keep_coef=0.0).backward()
    assert torch.all(z.grad > 0)                                   # descent lowers p(erase)


class _CenterReader(nn.Module):
    """Logit of class 1 = mean brightness of the centre 4x4 minus that of the rest."""

    def forward(self, x):
        inside = x[:, :, 6:10, 6:10].mean((1, 2, 3))
        score = 8 * (inside - x.mean((1, 2, 3)))
        return torch.stack([-score, score], 1)


def test_reward_sign_erasing_what_matters_is_positive():
    x = torch.full((4, 1, 16, 16), -1.0)
    x[:, :, 6:10, 6:10] = 1.0                                      # the label-carrying region
    y = torch.ones(4, dtype=torch.long)
    hook = APGAHook("binary-class", create_model("unet_small", 1, 1), fill_value())
    model = _CenterReader()
    clean = hook.criterion(model(x), y)
    centre, corner = torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 16, 16)
    centre[:, :, 6:10, 6:10] = 1
    corner[:, :, :4, :4] = 1
    assert torch.all(hook.erased_loss(model, x, y, centre) - clean > 0.5)
    assert torch.allclose(hook.erased_loss(model, x, y, corner) - clean, torch.zeros(4), atol=1e-5)


# ---- Grad-CAM ------------------------------------------------------------------------------------
def test_gradcam_of_a_toy_model_lights_up_the_label_region():
    torch.manual_seed(0)
    ds = _toy_ds((60, 60), size=16)
    model = train_plain(create_model("cnn", 2, 1, widths=(8, 16)), ds["train"], epochs=15, batch_size=30)
    split = ds["val"]
    pos = split.labels == 1
    x = split.images[pos].float().div(255).sub(0.5).div(0.5)
    cam = gradcam_maps(model, x, torch.ones(len(x), dtype=torch.long))
    assert cam.shape == x.shape and float(cam.min()) >= 0 and float(cam.max()) <= 1 + 1e-6
    square = split.images[pos] > 200
    inside = (cam * square).flatten(1).sum(1) / square.flatten(1).sum(1)
    outside = (cam * ~square).flatten(1).sum(1) / (~square).flatten(1).sum(1)
    assert float((inside > 2 * outside).float().mean()) > 0.8


# ---- dense models ----------------------------------------------------------------------------------
def test_dense_models_are_registered_and_keep_the_image_size():
    assert is_dense("unet_small") and is_dense("smp_unet") and not is_dense("cnn")
    for side in (28, 15):
        out = create_model("unet_small", 1, 1)(torch.randn(2, 1, side, side))
        assert out.shape == (2, 1, side, side)


def test_smp_unet_takes_64_px_and_refuses_28_with_a_fix():
    m = create_model("smp_unet", 1, 1, encoder_depth=3, decoder_channels=(32, 16, 8))
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="unet_small"):
        create_model("smp_unet", 1, 1)(torch.randn(1, 1, 28, 28))


# ---- hooks in the shared fit loop ------------------------------------------------------------------
def _fit_with(hook, epochs=2, seed=0):
    torch.manual_seed(seed)
    ds = _toy_ds()
    model = create_model("cnn", 2, 1, widths=(8, 16))
    loader = data_mod.TensorLoader(ds["train"], 16, shuffle=True, seed=seed)
    val = data_mod.TensorLoader(ds["val"], 64)
    cfg = FitConfig(epochs=epochs, lr=1e-3, progress="none", channels_last=False)
    return fit(model, loader, val, ds.task, cfg, hooks=[hook])


@pytest.mark.parametrize("faithful", [False, True])
def test_apga_hook_runs_in_fit_logs_rl_and_keeps_the_best_agent(faithful):
    torch.manual_seed(0)
    agent = create_model("unet_small", 1, 1, widths=(4, 8))
    probe = (torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 1]))
    hook = APGAHook("binary-class", agent, fill_value(), faithful=faithful, probe=probe, agent_steps=2)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    res = _fit_with(hook, epochs=3)
    h = res.history
    for key in ("rl/reward", "rl/baseline", "rl/advantage", "rl/entropy", "apga/erase_area", "apga/inverse_loss"):
        assert key in h and h[key].notna().all(), key
    assert any(not torch.equal(before[k], v) for k, v in agent.state_dict().items())   # the agent learned
    if faithful:
        assert h["rl/entropy"].notna().all()
    arrays = hook.unit_arrays()
    assert arrays["probe_erase_p"].shape == (3, 1, 16, 16)
    assert hook.fingerprint["faithful"] is faithful


def test_every_hook_takes_exactly_one_extra_update_per_batch():
    counts = {}
    for hook in (RepeatHook("binary-class"), CutoutHook("binary-class", -1.0, seed=0),
                 EndToEndHook("binary-class", create_model("unet_small", 1, 1, widths=(4, 8)), -1.0),
                 GradCAMHook("binary-class", create_model("cnn", 2, 1, widths=(8, 16)), -1.0),
                 APGAHook("binary-class", create_model("unet_small", 1, 1, widths=(4, 8)), -1.0, agent_steps=2)):
        steps = []
        original = hook.classifier_step

        def counting(*a, _orig=original, **kw):
            steps.append(1)
            return _orig(*a, **kw)

        hook.classifier_step = counting
        _fit_with(hook, epochs=1)
        counts[type(hook).__name__] = len(steps)
    batches = -(-42 // 16)
    assert counts == {name: batches for name in counts}


def test_hook_state_is_restored_at_the_best_epoch():
    hook = CutoutHook("binary-class", -1.0, seed=3)
    res = _fit_with(hook, epochs=3)
    assert res.best_epoch >= 1 and isinstance(hook.state_dict()["generator"], torch.Tensor)


# ---- the fair protocol --------------------------------------------------------------------------------
def test_the_protocol_refuses_early_stopping():
    check_protocol(FitConfig(epochs=3))
    with pytest.raises(ParamsError, match="same number of validation looks"):
        check_protocol(FitConfig(epochs=3, patience=2))


def test_unequal_validation_looks_are_caught():
    rows = [{"flag": "f", "k": "10", "seed": 0, "method": m, "epoch": e, "val/auc": 0.5,
             "rl/reward": 0.1 if m == "apga" else float("nan")}     # NaN columns of other methods do not count
            for m, n in (("clean", 3), ("apga", 3)) for e in range(n)]
    looks = check_equal_looks(pd.DataFrame(rows))
    assert set(looks["val_looks"]) == {3}
    rows.append({"flag": "f", "k": "10", "seed": 0, "method": "apga", "epoch": 3, "val/auc": 0.6})
    with pytest.raises(AssertionError, match="unequal validation looks"):
        check_equal_looks(pd.DataFrame(rows))


def test_budget_table_reads_epochs_looks_and_seconds_back_and_shows_seconds_to_one_decimal():
    from helpers.apga.protocol import budget_table
    from helpers.page import table

    hist = pd.DataFrame([{"flag": "f", "k": "10", "seed": s, "method": m, "epoch": e, "val/auc": 0.5}
                         for s in range(2) for m in ("clean", "apga") for e in range(4)])
    units = pd.DataFrame([{"flag": "f", "size": 28, "k": "10", "seed": s, "method": m, "epochs_run": 4,
                           "train_s": 10.0 + s + (5 if m == "apga" else 0) + 0.123456,
                           "best_epoch": 1 if m == "clean" else 1 + 2 * s}
                          for s in range(2) for m in ("clean", "apga")])
    t = budget_table(units, hist)
    assert t.set_index("method")["val looks"].to_dict() == {"clean": 4, "apga": 4}
    assert t.set_index("method")["selected epoch"].to_dict() == {"clean": "1.0", "apga": "2.0"}
    assert t.set_index("method")["selected at 1"].to_dict() == {"clean": "2/2", "apga": "1/2"}
    assert t.set_index("method")["mean_train_s"].round(4).to_dict() == {"clean": 10.6235, "apga": 15.6235}
    shown = table(t).formatted()
    assert shown["mean train time (s)"].tolist() == ["10.6", "15.6"]


def test_comparisons_and_outcomes():
    units = pd.DataFrame([{"flag": "f", "size": 28, "k": "10", "seed": s, "method": m, "test/acc": v + 0.01 * s}
                          for s in range(3) for m, v in (("clean", 0.5), ("cutout", 0.6), ("apga", 0.7))])
    units.loc[(units.method == "apga") & (units.seed == 1), "test/acc"] += 0.003
    table = comparisons(units, "test/acc")
    assert list(table["b"]) == ["clean", "cutout"] and "p_holm" in table
    assert [outcome(r) for _, r in table.iterrows()] == ["won", "won"]
    assert outcome({"mean_diff": -0.1, "p": 0.001}) == "lost" and outcome({"mean_diff": 0.1, "p": 0.2}) == "tied"
    assert "won 1, lost 0 and tied 0 of 1" in outcome_sentence(table, "test accuracy")


# ---- a run carried over by a stash (helpers.book.stash leaves weights behind) -----------------------
def test_a_stashed_baseline_without_weights_is_retrained_only_when_a_method_needs_it(tmp_path):
    from helpers.apga.protocol import method_code, run_protocol
    from helpers.results import Recorder, read_json, unit_name, write_json

    ds = _toy_ds((12, 12), size=16)
    rec = Recorder(tmp_path)
    kw = dict(seeds=[0], ks=[4], model="cnn", model_kwargs={"widths": [4, 8]}, batch_size=8,
              pretrain=FitConfig(epochs=1, progress="none", channels_last=False),
              cfg=FitConfig(epochs=1, lr=1e-4, progress="none", channels_last=False, schedule="none"),
              agent={"model": "unet_small", "kwargs": {"widths": [4, 8]}}, apga={"agent_steps": 1},
              end2end={}, cutout={}, gradcam={}, probe_n=2, precise_bn=False)
    run_protocol(rec, ds, methods=["clean"], **kw)
    pre = next(u["keys"] for u in rec.units() if u["keys"]["method"] == "pretrain")
    made = rec.load_unit(**pre)["fingerprint"]
    rec.model_path(**pre).unlink()                       # as a restored stash leaves it
    run_protocol(rec, ds, methods=["clean"], **kw)       # every method unit stored: nothing retrained
    assert not rec.model_path(**pre).is_file()
    old_clean = next(u["keys"] for u in rec.units() if u["keys"]["method"] == "clean")
    assert rec.load_unit(**old_clean)["code_digest"] == method_code()

    # a unit made by other code (a stash resumed on another commit) is not kept on trust
    for keys in (old_clean, pre):
        path = tmp_path / "units" / f"{unit_name(**keys)}.json"
        write_json(path, {**read_json(path), "code_digest": "other code", "fingerprint": "other code"})
        run_protocol(rec, ds, methods=["clean"], **kw)
        assert rec.model_path(**pre).is_file(), f"{keys['method']} made by other code: the baseline must be retrained"
        assert rec.load_unit(**pre)["fingerprint"] == made
        clean = next(u for u in rec.units() if u["keys"]["method"] == "clean")
        assert clean["code_digest"] == method_code() and clean["fingerprint"] != "other code"
        rec.model_path(**pre).unlink()
    old_clean = clean["keys"]
    run_protocol(rec, ds, methods=["clean", "cutout"], **kw)   # cutout starts from the baseline: retrained
    assert rec.model_path(**pre).is_file() and rec.load_unit(**pre)["fingerprint"] == made
    cleans = [u["keys"] for u in rec.units() if u["keys"]["method"] == "clean"]
    assert len(cleans) == 1                               # one clean unit per k and seed, never two
    new_variant = cleans[0].get("variant")
    assert rec.has_unit(**old_clean) == (old_clean.get("variant") == new_variant)
    assert [u["keys"]["method"] for u in rec.units()].count("cutout") == 1
