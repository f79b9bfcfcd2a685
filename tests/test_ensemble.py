"""The ensemble chapter's helpers: combiners, the RL weighting, the oversampler, cross-fitting, augmentation."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
import torch

from helpers.ensemble import augment as ens_aug
from helpers.ensemble import combine as C
from helpers.ensemble import members as M
from helpers.rl import reinforce_loss
from helpers.train import FitConfig


def _stack(n=240, k=3, classes=2, good=0, seed=0, noise=0.35) -> M.ScoreStack:
    """A stack where member ``good`` is informative and the others are noise."""
    rng = np.random.default_rng(seed)

    def split(m):
        y = rng.integers(0, classes, m)
        probs = rng.dirichlet(np.ones(classes), size=(k, m))
        onehot = np.eye(classes)[y]
        probs[good] = (1 - noise) * onehot + noise * probs[good]
        return probs, y
    (tr, ytr), (va, yva), (te, yte) = split(n), split(n // 2), split(n // 2)
    return M.ScoreStack(tr, va, te, ytr, yva, yte, names=[f"member {i}" for i in range(k)])


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks (conftest.py)


CFG = FitConfig.from_params({"epochs": 6, "lr": 1.0e-2, "weight_decay": 0.0, "schedule": "none", "grad_clip": 1.0})


# ---- temperature and weights -------------------------------------------------------------
def test_temperature_stays_positive_for_any_raw_value():
    net = C.WeightNet(3, 2, min_temperature=0.05)
    for raw in (-1e4, -50.0, 0.0, 50.0):
        with torch.no_grad():
            net.raw_temperature.fill_(raw)
        assert float(net.temperature.detach()) >= 0.05
    w = net.mean_weights(torch.randn(4, 3, 2))
    assert torch.isfinite(w).all() and torch.allclose(w.sum(1), torch.ones(4))


def test_temperature_stays_positive_when_training_pushes_it_down():
    net = C.WeightNet(3, 2, min_temperature=0.05)
    opt = torch.optim.SGD([net.raw_temperature], lr=100.0)
    for _ in range(20):
        opt.zero_grad()
        net.temperature.backward()          # minimise T with a huge step
        opt.step()
        assert float(net.temperature.detach()) > 0


def test_weighting_learns_to_trust_the_informative_member():
    st = _stack(good=1)
    res = C.fit_weighting(st, "ce", CFG, seed=0)
    assert res["weights"]["val"].mean(0).argmax() == 1


# ---- REINFORCE -----------------------------------------------------------------------------
def test_rl_prediction_carries_no_gradient_and_loss_is_reinforce():
    torch.manual_seed(0)
    net = C.WeightNet(3, 2, policy="dirichlet").train()
    logp = torch.log_softmax(torch.randn(16, 3, 2), -1)
    y = torch.randint(0, 2, (16,))
    obj = C.ReinforceLoss(net, reward="loglik", entropy_coef=0.01, normalize=False)
    out = net(logp)
    assert not out.requires_grad             # the sampled weights are not differentiated through
    per_sample = obj(out, y)
    loss = per_sample.mean()
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True, retain_graph=True)
    # the same gradient from the log-probability term alone (helpers.rl.reinforce_loss)
    r = obj.rewards(out, y)
    adv = r - obj.baseline.value
    ref = reinforce_loss(net.last["log_prob"], adv, net.last["entropy"], 0.01)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()), allow_unused=True)
    for g, h in zip(grads, ref_grads):
        assert (g is None and h is None) or torch.allclose(g, h, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_rl_weights_are_sampled_and_eval_uses_the_mean():
    torch.manual_seed(0)
    net = C.WeightNet(3, 2, policy="dirichlet")
    logp = torch.log_softmax(torch.randn(8, 3, 2), -1)
    net.train()
    a, b = net(logp), net(logp)
    assert not torch.allclose(a, b)          # stochastic policy
    net.eval()
    assert torch.allclose(net(logp), net(logp))
    assert "log_prob" not in net.last


def test_rl_weighting_logs_rl_keys_and_learns():
    st = _stack(good=2, n=320)
    cfg = FitConfig.from_params({"epochs": 8, "lr": 1.0e-2, "weight_decay": 0.0, "schedule": "none"})
    res = C.fit_weighting(st, "rl", cfg, seed=0, concentration=10.0)
    hist = res["history"]
    for key in ("rl/reward", "rl/baseline", "rl/advantage", "rl/entropy", "temperature"):
        assert key in hist and hist[key].notna().all(), key
    assert res["weights"]["val"].mean(0).argmax() == 2


def test_faithful_loss_is_deterministic_ce_plus_regulariser():
    torch.manual_seed(0)
    net = C.WeightNet(3, 2).train()
    logp = torch.log_softmax(torch.randn(6, 3, 2), -1)
    y = torch.randint(0, 2, (6,))
    out = net(logp)
    assert torch.allclose(out, net(logp))    # nothing sampled
    loss = C.FaithfulLoss(net, 0.1)(out, y)
    w = net.last["mean"]
    r = 2 * (out.argmax(1) == y).float() - 1
    expected = torch.nn.functional.nll_loss(out, y, reduction="none") - 0.1 * r * torch.log(w).sum(1)
    assert torch.allclose(loss, expected, atol=1e-6)


# ---- no leakage -------------------------------------------------------------------------------
@pytest.mark.parametrize("combiner", ["average", "stacker", "ce", "faithful", "rl"])
def test_no_combiner_learns_from_validation_or_test_labels(combiner, tmp_path):
    """Scrambling val and test labels changes nothing a combiner outputs (one epoch: no selection)."""
    from helpers.results import Recorder

    st = _stack()
    rng = np.random.default_rng(1)
    scrambled = M.ScoreStack(st.train, st.val, st.test, st.y_train, rng.permutation(st.y_val),
                             1 - st.y_test, st.names)
    cfg = FitConfig.from_params({"epochs": 1, "lr": 1.0e-2, "schedule": "none"})
    outs = []
    for i, s in enumerate((st, scrambled)):
        rec = Recorder(tmp_path / f"r{i}")
        u = C.combiner_unit(rec, s, combiner, 0, cfg, "binary-class")
        outs.append({k: rec.scores(**u["keys"])[f"{k}_scores"] for k in ("val", "test")})
    for k in ("val", "test"):
        np.testing.assert_allclose(outs[0][k], outs[1][k], atol=1e-6)


def test_test_labels_never_matter_even_with_selection(tmp_path):
    from helpers.results import Recorder

    st = _stack()
    flipped = M.ScoreStack(st.train, st.val, st.test, st.y_train, st.y_val, 1 - st.y_test, st.names)
    outs = []
    for i, s in enumerate((st, flipped)):
        rec = Recorder(tmp_path / f"r{i}")
        u = C.combiner_unit(rec, s, "rl", 0, CFG, "binary-class", expert=s.take([0]))
        outs.append(rec.scores(**u["keys"])["test_scores"])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


# ---- oversampler and cross-fitting ---------------------------------------------------------
def test_oversampler_only_marks_training_images():
    with pytest.raises(ValueError, match="training positions"):
        M.oversample_weights(10, np.array([3, 12]))
    with pytest.raises(ValueError, match="entries"):
        M.oversample_weights(10, np.zeros(11, dtype=bool))
    w = M.oversample_weights(10, np.array([1, 4]), factor=3.0)
    assert w.tolist() == [1, 3, 1, 1, 3, 1, 1, 1, 1, 1]


def test_oversampler_draws_training_images_and_raises_the_share():
    n = 400
    wrong = np.zeros(n, dtype=bool)
    wrong[:40] = True                                  # 10 % misclassified
    w = M.oversample_weights(n, wrong, factor=4.0)
    gen = torch.Generator().manual_seed(0)
    drawn = torch.multinomial(w, 5000, replacement=True, generator=gen)
    assert int(drawn.min()) >= 0 and int(drawn.max()) < n
    share = M.sampler_share(w, wrong, epochs=5, seed=0)
    assert share["share_in_data"] == pytest.approx(0.1)
    assert share["share_expected"] == pytest.approx(160 / 520)
    assert share["share_in_batches"] > 0.2            # well above the 10 % in the data
    flat = M.sampler_share(M.oversample_weights(n, wrong, factor=1.0), wrong, epochs=5, seed=0)
    assert abs(flat["share_in_batches"] - 0.1) < 0.03


def test_fold_dataset_refuses_overlap_and_keeps_val_test():
    from helpers.data import MedMNIST, Split

    def split(n):
        return Split(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n) % 2)
    ds = MedMNIST("x", 28, "binary-class", 1, {"0": "a", "1": "b"}, {"train": split(10), "val": split(4), "test": split(4)})
    f = M.fold_dataset(ds, np.arange(0, 6), np.arange(6, 10))
    assert len(f["train"]) == 6 and len(f["oof"]) == 4 and f["val"] is ds["val"]
    with pytest.raises(ValueError, match="overlap"):
        M.fold_dataset(ds, np.arange(0, 6), np.arange(5, 10))


def test_member_seeds_are_distinct():
    seeds = {M.member_seed(s, m, f) for s in range(5) for m in range(10) for f in range(5)}
    assert len(seeds) == 250


# ---- augmentation ----------------------------------------------------------------------------
def test_albumentations_hook_keeps_shape_range_and_is_reproducible():
    x = torch.rand(5, 1, 28, 28) * 2 - 1            # normalised with mean 0.5, std 0.5
    model = torch.nn.Linear(1, 1).train()
    a = ens_aug.AlbumentationsHook(28, seed=3).transform_batch(x, None, model)[0]
    b = ens_aug.AlbumentationsHook(28, seed=3).transform_batch(x, None, model)[0]
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= -1 - 1e-6 and float(a.max()) <= 1 + 1e-6
    assert not torch.equal(a, x)
    assert torch.equal(ens_aug.AlbumentationsHook(28).transform_batch(x, None, model.eval())[0], x)


def _tensor_backend(x01: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The photometric part of the "tensor" backend on a float batch in [0, 1], as train_and_test
    runs it: the loader's BatchAugment spec less its geometric keys, its normalisation (0.5, 0.5),
    then the backend's hooks; back in [0, 1]."""
    from helpers.augment import make_augment

    spec, hooks = ens_aug.backend_setup("tensor", x01.shape[-1], seed)
    geometric = ("crop_scale", "hflip", "vflip", "rotate", "translate", "scale")
    aug = make_augment({k: v for k, v in spec.items() if k not in geometric})
    x = aug(x01, torch.Generator().manual_seed(seed)) if aug is not None else x01
    x = (x - 0.5) / 0.5
    model = torch.nn.Linear(1, 1).train()
    for hook in hooks:
        x = hook.transform_batch(x, None, model)[0]
    return x * 0.5 + 0.5


def test_tensor_backend_colour_has_the_reference_strength():
    # the reference: OneOf(ColorJitter .4 (brightness a factor 0.6-1.4), blur, equalize), then erasing p 0.2
    # to the normalised 0. On a mid-grey flat image blur, equalize and that erasing change nothing, so
    # only the jitter (about 1/3 of images) moves the centre, by at most 0.4 * 0.5 = 0.2, never by 0.4.
    # The old TENSOR_SPEC (additive brightness 0.4 on every image) failed all three checks.
    n = 3000
    out = _tensor_backend(torch.full((n, 1, 28, 28), 0.5))
    centre = out[:, 0, 12:16, 12:16].mean((1, 2))
    changed = (centre - 0.5).abs() > 1e-3
    assert 0.28 < float(changed.float().mean()) < 0.39
    assert float((centre - 0.5).abs().max()) <= 0.2 + 1e-4
    # black stays black under multiplicative brightness (additive brightness lifts it)
    dark = _tensor_backend(torch.zeros(n, 1, 28, 28), seed=1)[:, 0, 12:16, 12:16]
    assert float((dark > 0.02).float().mean()) < 0.25


def test_reference_colour_ops_blur_and_equalize():
    col = ens_aug.ReferenceColour(erase=0.0)
    x = torch.rand(64, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    out = col(x, gen)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    gen2 = torch.Generator().manual_seed(0)
    choice = torch.randint(0, 3, (64,), generator=gen2)
    eq = out[choice == 2]                                           # equalized: spans [0, 1]
    assert torch.allclose(eq.amax((1, 2, 3)), torch.ones(len(eq))) and float(eq.amin()) == 0.0
    blur = out[choice == 1]                                         # blurred: less variance than the input
    assert float(blur.var((1, 2, 3)).mean()) < float(x[choice == 1].var((1, 2, 3)).mean())
    flat = torch.full((8, 1, 28, 28), 0.3)
    assert torch.allclose(ens_aug.ReferenceColour(brightness=0.0, contrast=0.0, erase=0.0)(flat, gen), flat, atol=1e-6)


def test_tensor_colour_hook_is_reproducible_and_off_in_eval():
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    model = torch.nn.Linear(1, 1)
    a = ens_aug.TensorColourHook(seed=4).transform_batch(x, None, model.train())[0]
    b = ens_aug.TensorColourHook(seed=4).transform_batch(x, None, model.train())[0]
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(ens_aug.TensorColourHook(seed=4).transform_batch(x, None, model.eval())[0], x)
    h = ens_aug.TensorColourHook(seed=4)
    state = h.state_dict()
    first = h.transform_batch(x, None, model.train())[0]
    h.load_state_dict(state)
    assert torch.equal(h.transform_batch(x, None, model.train())[0], first)


def test_backend_setup_and_throughput():
    spec, hooks = ens_aug.backend_setup("tensor", 28, 0)
    assert spec == ens_aug.TENSOR_SPEC and [type(h) for h in hooks] == [ens_aug.TensorColourHook]
    assert not {"brightness", "contrast", "erase"} & set(spec)      # colour and erasing are the hook's
    assert ens_aug.backend_setup("albumentations", 28, 0)[0] is None
    with pytest.raises(ValueError, match="augment_backend"):
        ens_aug.backend_setup("kornia", 28, 0)
    out = ens_aug.throughput(torch.randint(0, 255, (16, 1, 28, 28), dtype=torch.uint8), batch_size=8, repeats=1)
    assert out["tensor_img_s"] > 0 and out["albumentations_img_s"] > 0
    assert out["ratio"] == pytest.approx(out["tensor_img_s"] / out["albumentations_img_s"])


def test_augment_benchmark_reports_both_paths_and_their_ratio(shared_data, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ensemble_augment.py"
    spec = importlib.util.spec_from_file_location("bench_ensemble_augment", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--sizes", "28", "--images", "32", "--repeats", "1"])
    text = capsys.readouterr().out
    assert "tensor img/s" in text and "albumentations img/s" in text and "ratio" in text
    assert rows[0]["images"] == 32 and rows[0]["ratio"] > 0


def test_results_tables_and_finding_from_stored_units(tmp_path):
    """The page's tables come from stored units: members, combiners with and without the gate."""
    import pandas as pd
    from helpers.ensemble import pipeline
    from helpers.results import Recorder

    cfg = FitConfig.from_params({"epochs": 2, "lr": 1.0e-2, "schedule": "none"})
    rec = Recorder(tmp_path / "r")
    runs = {}
    for seed in (0, 1, 2):
        st = _stack(seed=seed, n=120)
        ex = st.take([0])
        combs = {(c, g): C.combiner_unit(rec, st, c, seed, cfg, "binary-class", expert=ex if g else None)
                 for c in C.COMBINERS for g in (False, True)}
        runs[seed] = {"stack": st, "expert_stack": ex, "combiners": combs, "experts": None}
    res = pipeline.results_table(rec, runs, "binary-class")
    assert set(res["method"]) >= {"member 0", "expert alone", "plain average", "weighting, REINFORCE + expert gate"}
    main = pipeline.main_table(res)
    assert main["n"].eq(3).all() and "±" in main["test/acc"].iloc[0]
    cmp = pipeline.paired_vs_average(res)
    assert set(cmp["b"]) == {"plain average"} and "p_holm" in cmp
    text = pipeline.finding(cmp)
    assert "plain averaging" in text and "REINFORCE" in text
    gates = pipeline.gate_table(res)
    assert len(gates) == len(C.COMBINERS)
    groups = pipeline.group_table(rec, "rl", True, 0, {"0": "a", "1": "b"})
    assert list(groups["group"]) == ["a", "b", "all"] and groups["total"].iloc[-1] == 60
    assert isinstance(pipeline.reference_parts_table(), pd.DataFrame)
    assert pipeline.reference_parts_table()["correct"].iloc[-1] == 2652


def test_train_and_test_refuses_sample_weights_of_the_wrong_length(tmp_path):
    from helpers.data import MedMNIST, Split
    from helpers.experiment import train_and_test
    from helpers.results import Recorder

    def split(n):
        return Split(torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.arange(n) % 2)
    ds = MedMNIST("x", 28, "binary-class", 1, {"0": "a", "1": "b"}, {"train": split(8), "val": split(4), "test": split(4)})
    cfg = FitConfig.from_params({"epochs": 1})
    with pytest.raises(ValueError, match="sample_weights"):
        train_and_test(Recorder(tmp_path / "r"), ds, "cnn", 0, cfg, sample_weights=torch.ones(5))
