"""The noise-mask chapter's helpers: mask pipeline, policy, REINFORCE and faithful hooks, the mix."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import data as data_mod
from helpers.noise import (FaithfulCriterion, JointLabels, LinearWarmup, MaskConfig, NoiseMaskHook, NoisePolicy,
                           PolicyConfig, RandomBetaMasks, beta_for_mean, blur, build_mix, gaussian_kernel1d, kshot,
                           leave_one_out, make_mask, per_dataset_metrics, to_channels, upsample)
from helpers.noise import protocol
from helpers.config import ParamsError

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks (conftest.py)


TINY = PolicyConfig(backbone="cnn", widths=[4], hidden=8)


def _policy(grid=3, chans=1, cfg=TINY, **kw):
    return NoisePolicy(grid, chans, cfg.backbone, {"widths": cfg.widths}, cfg.hidden, **kw)


# ---- mask pipeline --------------------------------------------------------------------------
def test_mask_shapes_range_and_upsampling():
    cfg = MaskConfig(grid=4, kernel=5, sigma=1.0)
    cells = torch.rand(6, 16)
    m = make_mask(cells, cfg, (28, 28))
    assert m.shape == (6, 1, 28, 28) and not m.requires_grad
    assert float(m.min()) >= float(cells.min()) - 1e-6 and float(m.max()) <= float(cells.max()) + 1e-6
    up = upsample(cells, 4, (28, 28))
    assert torch.equal(up[:, 0, :7, :7], cells[:, 0].view(6, 1, 1).expand(6, 7, 7))   # cell 0 = top-left 7x7
    assert torch.equal(up[:, 0, 21:, 21:], cells[:, 15].view(6, 1, 1).expand(6, 7, 7))


def test_blur_keeps_constants_smooths_edges_and_sums_to_one():
    w = gaussian_kernel1d(13, 6.0)
    assert w.shape == (13,) and torch.isclose(w.sum(), torch.tensor(1.0)) and torch.equal(w, w.flip(0))
    flat = torch.full((2, 1, 16, 16), 0.3)
    assert torch.allclose(blur(flat, 5, 1.0), flat, atol=1e-6)
    step = torch.zeros(1, 1, 16, 16)
    step[..., 8:] = 1.0
    out = blur(step, 5, 1.0)
    assert 0 < float(out[0, 0, 0, 7]) < 0.5 < float(out[0, 0, 0, 8]) < 1   # the edge is softened
    assert torch.allclose(out[..., :5], torch.zeros(1, 1, 16, 5), atol=1e-6)   # far from it, untouched
    assert torch.equal(blur(step, 1, 1.0), step)


def test_mask_config_refuses_even_kernels():
    with pytest.raises(ParamsError, match="odd"):
        MaskConfig(grid=4, kernel=4)


def test_masked_image_is_the_normalised_image_times_the_mask_over_all_channels():
    hook = NoiseMaskHook(RandomBetaMasks(2, 2.0, 2.0), MaskConfig(2, 1, 1.0), "random")
    x = torch.randn(5, 3, 8, 8)
    torch.manual_seed(0)
    xm, _ = hook.transform_batch(x, torch.zeros(5, dtype=torch.long), None)
    ratio = xm / x
    assert torch.allclose(ratio[:, 0], ratio[:, 2]) and float(ratio.min()) > 0 and float(ratio.max()) < 1


# ---- policy ------------------------------------------------------------------------------------
def test_policy_blends_with_the_running_average_and_updates_it_at_0_99():
    pol = _policy(grid=3)
    x = torch.randn(8, 1, 12, 12)
    run_a = pol.run_a.clone()
    pol.train()
    feats = pol.encoder(x)
    ha = pol.head_a(feats)    # BN in train mode: the same batch gives the same head output
    a, _ = pol.log_concentrations(x)
    assert torch.allclose(a, 0.9 * run_a + 0.1 * ha, atol=1e-5)
    assert torch.allclose(pol.run_a, 0.99 * run_a + 0.01 * ha.mean(0, keepdim=True), atol=1e-5)
    assert float(run_a.min()) >= 0 and float(run_a.max()) <= 1      # initialised U(0, 1)
    pol.eval()
    before = pol.run_a.clone()
    pol(x)
    assert torch.equal(pol.run_a, before)                                 # eval never updates it
    assert pol(x).batch_shape == (8, 9) and pol.unconditional().batch_shape == (1, 9)


def test_masks_carry_gradient_to_the_policy_only_through_log_probabilities():
    pol = _policy(grid=2)
    hook = NoiseMaskHook(pol, MaskConfig(2, 1, 1.0), "reinforce", dataclasses.replace(TINY, lr=0.1))
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    xm, _ = hook.transform_batch(x, y, clf)
    assert not xm.requires_grad                                # no pathwise gradient through the sample
    per = torch.nn.functional.cross_entropy(clf(xm), y, reduction="none")
    per.mean().backward()
    assert all(p.grad is None for p in pol.parameters())      # the classifier's loss does not reach it
    before = [p.detach().clone() for p in pol.parameters()]
    hook.on_batch_end(xm, y, None, per.detach())               # REINFORCE: grads from log_prob x advantage
    assert any(not torch.equal(b, p) for b, p in zip(before, pol.parameters()))


def test_baseline_tracks_the_mean_reward():
    pol = _policy(grid=2)
    hook = NoiseMaskHook(pol, MaskConfig(2, 1, 1.0), "reinforce", dataclasses.replace(TINY, lr=0.0))
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        x = torch.randn(8, 1, 8, 8)
        xm, y = hook.transform_batch(x, torch.zeros(8, dtype=torch.long), None)
        hook.on_batch_end(xm, y, None, 2.0 + 0.3 * torch.randn(8, generator=gen))   # reward = -loss ~ -2
    assert float(hook.baseline.value) == pytest.approx(-2.0, abs=0.15)
    logs = hook.on_epoch_end(1, {})
    assert {"rl/reward", "rl/baseline", "rl/advantage", "rl/entropy", "noise/mask_mean"} <= set(logs)
    assert logs["rl/reward"] == pytest.approx(-2.0, abs=0.1) and abs(logs["rl/advantage"]) < 0.1


def test_policy_learns_not_to_mask_the_label_carrying_region():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, lr=0.05)
    pol = _policy(grid=2, cfg=cfg, blend=0.0)
    hook = NoiseMaskHook(pol, MaskConfig(2, 1, 1.0), "reinforce", cfg)

    def classifier(x):   # fixed: reads the label from the top-left quadrant (grid cell 0) only
        s = x[:, 0, :4, :4].mean((1, 2))
        return torch.stack([-4 * s, 4 * s], 1)

    for _ in range(150):
        y = torch.randint(0, 2, (64,))
        x = 0.1 * torch.randn(64, 1, 8, 8)
        x[:, :, :4, :4] += (2 * y.float() - 1).view(-1, 1, 1, 1)
        xm, _ = hook.transform_batch(x, y, None)
        logits = classifier(xm)
        hook.on_batch_end(xm, y, logits, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    pol.eval()
    with torch.no_grad():
        keep = pol(x).mean.mean(0)       # mask value = how much of the image is kept
    assert float(keep[0]) > 0.85 and float(keep[0]) > float(keep[1:].max()) + 0.25
    assert hook.trace[-1]["rl/reward"] > hook.trace[0]["rl/reward"]


def test_faithful_loss_is_ce_times_logsumexp_with_one_backward_for_both():
    pol = _policy(grid=2)
    hook = NoiseMaskHook(pol, MaskConfig(2, 1, 1.0), "faithful", TINY)
    crit = FaithfulCriterion(hook)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    xm, _ = hook.transform_batch(x, y, clf)
    per = crit(clf(xm), y)
    loss = crit.reduce(per, y)
    assert torch.isclose(loss, per.mean() * hook._lp.mean())
    hook.on_batch_end(xm, y, None, per.detach())
    loss.backward()
    assert all(p.grad is not None for p in clf.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pol.parameters())
    before = [p.detach().clone() for p in pol.parameters()]
    hook.on_epoch_end(1, {})      # the deferred policy step
    assert any(not torch.equal(b, p) for b, p in zip(before, pol.parameters()))
    assert all(p.grad is None for p in pol.parameters())


def test_random_control_matches_the_requested_mean_strength():
    a, b = beta_for_mean(0.7, 3.0)
    assert (a, b) == pytest.approx((2.1, 0.9))
    hook = NoiseMaskHook(RandomBetaMasks(4, a, b), MaskConfig(4, 3, 1.0), "random")
    assert hook.optimizer is None
    torch.manual_seed(0)
    for _ in range(20):
        xm, y = hook.transform_batch(torch.ones(32, 1, 16, 16), torch.zeros(32, dtype=torch.long), None)
        hook.on_batch_end(xm, y, None, torch.ones(32))
    logs = hook.on_epoch_end(1, {})
    assert logs["noise/mask_mean"] == pytest.approx(0.7, abs=0.02)
    assert logs["noise/concentration"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        beta_for_mean(1.2, 3.0)


def test_linear_warmup_ramps_from_the_start_factor_then_holds():
    w = LinearWarmup(epochs=2, steps_per_epoch=5, start_factor=0.01)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    w.on_fit_start(None, opt, "cpu")
    lrs = []
    for _ in range(14):
        w.transform_batch(None, None, None)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.001) and lrs[5] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert lrs[10:] == pytest.approx([0.1] * 4) and all(a <= b for a, b in zip(lrs, lrs[1:]))


# ---- the mix --------------------------------------------------------------------------------
def test_joint_label_space_maps_every_label_one_to_one_and_back():
    joint = JointLabels(("organamnist", "pneumoniamnist", "retinamnist"), (11, 2, 5))
    assert joint.size == 18 and joint.offsets == {"organamnist": 0, "pneumoniamnist": 11, "retinamnist": 13}
    seen = []
    for flag, n in zip(joint.flags, joint.n_classes):
        j = joint.to_joint(flag, torch.arange(n))
        flags, local = joint.to_local(j)
        assert flags == [flag] * n and torch.equal(local, torch.arange(n))
        seen += j.tolist()
    assert sorted(seen) == list(range(18))      # one-to-one onto the joint space
    with pytest.raises(ValueError):
        joint.to_joint("pneumoniamnist", torch.tensor([2]))


@pytest.fixture
def mix_root(tmp_path, make_npz):
    for flag, n in (("organamnist", (44, 22, 22)), ("pneumoniamnist", (20, 8, 8)), ("retinamnist", (25, 10, 10))):
        make_npz(tmp_path, flag, n=n, seed=len(flag))
    return tmp_path


def test_build_mix_mixes_grayscale_and_rgb_and_keeps_every_label(mix_root):
    flags = ["organamnist", "pneumoniamnist", "retinamnist"]
    mix = build_mix(flags, 28, mix_root, channels=3, verify=False)
    assert mix.n_channels == 3 and mix["train"].images.shape[1:] == (3, 28, 28) and mix.n_classes == 18
    gray = mix["train"].images[mix.source["train"] == 0]
    assert torch.equal(gray[:, 0], gray[:, 2])          # grayscale replicated
    for name in ("train", "val", "test"):
        for i, flag in enumerate(flags):
            ds = data_mod.load(flag, 28, mix_root, verify=False)
            sel = mix.source[name] == i
            got, local = mix.joint.to_local(mix[name].labels[sel])
            assert set(got) == {flag} and torch.equal(local, ds[name].labels)
    one = build_mix(flags, 28, mix_root, channels=1, verify=False)
    rgb = data_mod.load("retinamnist", 28, mix_root, verify=False)["train"].images.float()
    lum = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).round()
    assert torch.equal(one["train"].images[one.source["train"] == 2][:, 0].float(), lum)
    capped = build_mix(flags, 28, mix_root, max_train=10, verify=False)
    assert torch.bincount(capped.source["train"]).tolist() == [10, 10, 10]


def test_build_mix_refuses_multilabel_flags(tmp_path, make_npz):
    make_npz(tmp_path, "chestmnist")
    with pytest.raises(ValueError, match="multi-label"):
        build_mix(["chestmnist"], 28, tmp_path, verify=False)


def test_leave_one_out_never_lets_the_held_out_dataset_into_pretraining(mix_root):
    flags = ["organamnist", "pneumoniamnist", "retinamnist"]
    loo = leave_one_out(flags, "pneumoniamnist", size=28, root=mix_root, verify=False)
    assert loo.joint.flags == ("organamnist", "retinamnist") and loo.n_classes == 16
    held = to_channels(data_mod.load("pneumoniamnist", 28, mix_root, verify=False), 3)
    for name in ("train", "val", "test"):
        imgs = loo[name].images.flatten(1)
        for img in held[name].images.flatten(1):
            assert not (imgs == img).all(1).any()
        assert set(loo.source[name].tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="not in the mix"):
        leave_one_out(flags, "breastmnist", size=28, root=mix_root, verify=False)


def test_kshot_takes_at_most_k_per_class_and_keeps_val_and_test(mix_root):
    ds = data_mod.load("organamnist", 28, mix_root, verify=False)
    few = kshot(ds, 2, seed=0)
    assert torch.bincount(few["train"].labels, minlength=11).max() <= 2 and len(few["train"]) == 22
    assert few["val"] is ds["val"] and kshot(ds, 0) is ds


def test_per_dataset_metrics_score_each_dataset_in_its_own_labels(mix_root):
    mix = build_mix(["organamnist", "pneumoniamnist", "retinamnist"], 28, mix_root, verify=False)
    labels = mix["test"].labels.numpy()
    perfect = np.eye(mix.n_classes)[labels] * 0.9 + 0.1 / mix.n_classes
    rows = per_dataset_metrics(mix, perfect, labels, np.arange(len(labels)))
    assert [r["dataset"] for r in rows] == list(mix.joint.flags)
    assert all(r["acc"] == 1.0 and r["f1"] == 1.0 and r["auc"] == 1.0 for r in rows)
    wrong = np.roll(perfect, 1, axis=1)
    assert all(r["acc"] < 1.0 for r in per_dataset_metrics(mix, wrong, labels, np.arange(len(labels))))


def test_transfer_state_keeps_the_backbone_and_reinitialises_the_head():
    from helpers.models import create_model

    src = create_model("cnn", num_classes=16, in_chans=3).state_dict()
    out = protocol.transfer_state(src, "cnn", 2, 3, seed=0)
    assert out["head.weight"].shape == (2, src["head.weight"].shape[1])
    assert torch.equal(out["features.0.weight"], src["features.0.weight"])
    with pytest.raises(ValueError, match="match"):
        protocol.transfer_state(src, "cnn", 2, 1, seed=0, widths=(8,))


def test_hook_runs_inside_fit_and_logs_rl_metrics_every_epoch(mix_root):
    from helpers.train import FitConfig, fit

    mix = build_mix(["organamnist", "retinamnist"], 28, mix_root, verify=False)
    pol = _policy(grid=4, chans=3)
    hook = NoiseMaskHook(pol, MaskConfig(4, 3, 1.0), "reinforce", TINY)
    from helpers.models import create_model

    model = create_model("cnn", num_classes=mix.n_classes, in_chans=3, widths=(8,))
    tl = data_mod.TensorLoader(mix["train"], 16, shuffle=True)
    vl = data_mod.TensorLoader(mix["val"], 64)
    res = fit(model, tl, vl, mix.task, FitConfig(epochs=2, monitor="val/acc", progress="none"), hooks=[hook])
    for key in ("rl/reward", "rl/baseline", "rl/advantage", "rl/entropy", "noise/mask_mean"):
        assert key in res.history and res.history[key].notna().all()
    assert len(hook.trace) == 2 * len(tl)


def test_overhead_benchmark_reports_every_setting_against_plain(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "noise_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_noise_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "1", "--rounds", "1", "--batch", "8", "--device", "cpu"])
    assert set(out["ratio_to_plain"]) == {"plain", "random", "policy", "faithful"}
    assert out["ratio_to_plain"]["plain"] == 1.0 and all(v > 0 for v in out["seconds_per_step"].values())
    assert "x plain" in capsys.readouterr().out


def test_an_outlier_cannot_drive_a_concentration_to_zero_and_nan_stops_the_run():
    from helpers.noise.policy import LOG_CONC_BOUND
    from helpers.train import NonFiniteLossError

    torch.manual_seed(0)
    pol = _policy(grid=3).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        pol.head_a[-1].bias.fill_(-2000.0)      # what an unbounded head did on the full profile: exp(-200) = 0
        pol.head_b[-1].bias.fill_(2000.0)
    dist = pol(x)                                 # a Beta accepts it
    lo, hi = np.exp(-LOG_CONC_BOUND), np.exp(LOG_CONC_BOUND)
    assert torch.all(dist.concentration1 >= lo * 0.999) and torch.all(dist.concentration0 <= hi * 1.001)
    assert torch.isfinite(dist.log_prob(dist.sample())).all()
    with torch.no_grad():                         # within the policies' usual range the bound is near the identity
        pol.head_a[-1].bias.zero_()
        pol.head_b[-1].bias.zero_()
        a, _ = pol.log_concentrations(x)
        log_a = pol(x).concentration1.log()
    assert torch.allclose(log_a, LOG_CONC_BOUND * torch.tanh(a / LOG_CONC_BOUND))
    assert float((log_a - a).abs().max()) < 0.05 * max(1.0, float(a.abs().max()))
    with pytest.raises(NonFiniteLossError, match="policy.lr"):
        pol(torch.full((2, 1, 16, 16), float("nan")))
