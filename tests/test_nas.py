"""The NAS controller and search loop on toy rewards (no child training: a fake evaluator)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from helpers import nas


def fake_evaluate(archs, child_seeds, data_seed):
    """Deterministic stand-in for child training: 5x5 kernels and dropout 0.5 are slightly better."""
    out = []
    for arch in archs:
        layer = arch[0]
        acc = 0.90 + 0.01 * (layer["kernel"] == 5) + 0.01 * (layer["dropout"] == 0.5)
        params = layer["filters"] * (layer["kernel"] ** 2 + 2157) + 11
        out.append({"val_acc": acc, "params": params, "train_s": 0.0})
    return out


def test_space_decode_and_enumeration():
    space = nas.SearchSpace()
    assert space.n_choices() == [4, 2, 3]
    assert space.decode([3, 1, 2]) == [{"filters": 128, "kernel": 5, "dropout": 0.5}]
    assert len(space.all_indices()) == 24
    assert len(space.all_indices(["filters == 128"])) == 18
    two = nas.SearchSpace(layers=2)
    assert len(two.tokens) == 6 and len(two.decode([0] * 6)) == 2


def test_arch_key_round_trip():
    arch = [{"filters": 32, "kernel": 5, "dropout": 0.25}, {"filters": 16, "kernel": 3, "dropout": 0.1}]
    assert nas.arch_from_key(nas.arch_key(arch)) == arch


@pytest.mark.parametrize("faithful", [False, True])
def test_masked_actions_are_never_sampled(faithful):
    torch.manual_seed(0)
    ctrl = nas.Controller(nas.SearchSpace(), faithful=faithful)
    with torch.no_grad():  # make the forbidden choice the most likely one before masking
        ctrl.heads[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 20.0]))
    idx, logp, ent = ctrl.sample(2000, ["filters == 128"], torch.Generator().manual_seed(1))
    assert (idx[:, 0] != 3).all()
    assert torch.isfinite(logp).all() and (ent > 0).all()


def test_multi_decision_rule_is_respected_step_by_step():
    ctrl = nas.Controller(nas.SearchSpace())
    rules = ["kernel == 5 and filters >= 64"]
    idx, _, _ = ctrl.sample(1000, rules, torch.Generator().manual_seed(0))
    archs = [nas.SearchSpace().decode(r)[0] for r in idx.tolist()]
    assert not any(a["kernel"] == 5 and a["filters"] >= 64 for a in archs)


def test_sampled_log_prob_matches_teacher_forcing_and_marginals_sum_to_one():
    torch.manual_seed(0)
    ctrl = nas.Controller(nas.SearchSpace())
    rules = ["filters == 128"]
    idx, logp, _ = ctrl.sample(64, rules, torch.Generator().manual_seed(2))
    assert torch.allclose(ctrl.log_prob(idx, rules), logp, atol=1e-5)
    m = ctrl.marginals(rules)
    assert math.isclose(sum(v for k, v in m.items() if k.startswith("p/filters=")), 1.0, abs_tol=1e-5)
    assert m["p/filters=128"] < 1e-6


def test_controller_learns_a_toy_reward():
    """REINFORCE with a moving-average baseline: P(filters=16) rises when 16 filters pay."""
    torch.manual_seed(0)
    space = nas.SearchSpace()
    cfg = nas.SearchConfig(space=space, episodes=200, children_per_update=4, lam=0.0, controller_lr=0.05)

    def evaluate(archs, seeds, data_seed):
        return [{"val_acc": 1.0 if a[0]["filters"] == 16 else 0.0, "params": 0} for a in archs]

    before = nas.Controller(space).marginals()["p/filters=16"]
    df = nas.run_search("rl", 0, cfg, evaluate, log=None)
    after = df["p/filters=16"].iloc[-1]
    assert before == pytest.approx(0.25, abs=0.1)
    assert after > 0.8
    assert df["rl/reward"].iloc[-40:].mean() > df["rl/reward"].iloc[:40].mean()


def test_controller_parameters_change_after_an_update():
    space = nas.SearchSpace()
    torch.manual_seed(0)
    ctrl = nas.Controller(space)
    before = [p.detach().clone() for p in ctrl.parameters()]
    opt = torch.optim.Adam(ctrl.parameters(), lr=0.01)
    idx, logp, ent = ctrl.sample(4, [], torch.Generator().manual_seed(0))
    (-(logp * torch.tensor([1.0, -1.0, 0.5, -0.5])).mean()).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, ctrl.parameters()))


@pytest.mark.parametrize("strategy", nas.STRATEGIES)
def test_every_strategy_runs_at_equal_budget(strategy):
    cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=10, children_per_update=3)
    df = nas.run_search(strategy, 1, cfg, fake_evaluate, log=None)
    assert len(df) == 10 and list(df["episode"]) == list(range(1, 11))
    assert (df["reward"] == df["val_acc"] - 1e-6 * df["params"]).all()
    if strategy.endswith("masked"):
        assert (df["filters"] != 128).all()
    if strategy.startswith("rl"):
        for key in ("rl/reward", "rl/baseline", "rl/advantage", "rl/entropy"):
            assert df[key].notna().all()
        if strategy == "rl_faithful":
            assert df["rl/advantage"].to_numpy() == pytest.approx(df["rl/reward"].to_numpy(), abs=1e-6)  # no baseline, as in the reference
    else:
        assert "rl/reward" not in df


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="valid"):
        nas.run_search("bayesian", 0, nas.SearchConfig(space=nas.SearchSpace(), episodes=1), fake_evaluate)


def test_same_child_seed_for_the_same_episode_across_strategies():
    seen = {}

    def record(strategy):
        def evaluate(archs, seeds, data_seed):
            seen.setdefault(strategy, []).extend(seeds)
            return fake_evaluate(archs, seeds, data_seed)
        return evaluate

    cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=6, children_per_update=4)
    for s in ("random", "rl"):
        nas.run_search(s, 3, cfg, record(s), log=None)
    assert seen["random"] == seen["rl"] == [300000 + e for e in range(6)]


def test_tables_champions_and_paired_test():
    rows = []
    for strategy, shift in (("rl", 0.02), ("random", 0.0)):
        for seed in range(3):
            cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=6, children_per_update=2)
            df = nas.run_search("random", seed, cfg, fake_evaluate, log=None)
            df["reward"] += shift + 0.001 * seed * (strategy == "rl")
            rows.append(df.assign(strategy=strategy, seed=seed))
    eps = pd.concat(rows, ignore_index=True)
    table = nas.phase_table(eps)
    assert set(table["strategy"]) == {"rl", "random"}
    champs = nas.champions(eps)
    assert len(champs) == 6
    res = nas.paired_comparison(eps, "rl", "random")
    assert res["n_seeds"] == 3 and res["mean_diff"] > 0.019 and res["p"] < 0.05
    text = nas.describe_comparison(pd.DataFrame([res]), pd.DataFrame([res]))
    assert "rl vs random" in text and "p =" in text
    best = nas.paired_comparison(eps, "rl", "random", reduce="max")
    per_seed_max = eps.groupby(["strategy", "seed"])["reward"].max()
    assert best["mean_a"] == pytest.approx(per_seed_max["rl"].mean())
    last_t, best_t = nas.compare_strategies(eps, last=3)
    assert list(zip(last_t["a"], last_t["b"])) == [("rl", "random")]   # only pairs whose strategies ran
    assert last_t["last"].iloc[0] == 3 and best_t["mean_a"].iloc[0] == pytest.approx(best["mean_a"])
