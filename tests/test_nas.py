"""The NAS search space and its rules, the controller, the search loop and its tables (fake evaluators)."""
from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
import torch

from helpers import nas, report, stats
from helpers.nas import allowed, parse_rule, sequential_mask
from helpers.rl import CategoricalPolicy, update_baseline


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
    cfg = nas.SearchConfig(space=space, episodes=200, children_per_update=4, lam=0.0,
                           controller=nas.ControllerConfig(lr=0.05))

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
    spec = nas.STRATEGIES[strategy]
    if spec.masked:
        assert (df["filters"] != 128).all()
    if spec.learns:
        for key in ("rl/reward", "rl/baseline", "rl/advantage", "rl/entropy"):
            assert df[key].notna().all()
        if spec.faithful:
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


def test_strategy_table():
    """Every strategy says what it is; every learned one names a non-learned control with the same masking."""
    assert list(nas.STRATEGIES) == ["random", "random_masked", "rl", "rl_masked", "rl_faithful", "rl_faithful_masked"]
    for name, spec in nas.STRATEGIES.items():
        assert spec.name == name and spec.what
        if spec.learns:
            control = nas.STRATEGIES[spec.control]
            assert not control.learns and control.masked == spec.masked
        else:
            assert spec.control is None and not spec.faithful
    for a, b in nas.COMPARISONS:
        assert a in nas.STRATEGIES and b in nas.STRATEGIES
    assert {(s.name, s.control) for s in nas.STRATEGIES.values() if s.control} <= set(nas.COMPARISONS)
    assert nas.COMPARISONS[:4] == (("rl", "random"), ("rl_masked", "random_masked"), ("rl_masked", "random"),
                                   ("rl", "rl_faithful"))     # the original rows first
    assert {("random_masked", "random"), ("rl_faithful", "random")} <= set(nas.COMPARISONS)
    for total, mask, rl in nas.DECOMPOSITIONS:       # total = mask + RL, through random_masked
        assert total[1] == mask[1] and mask[0] == rl[1] and total[0] == rl[0] and {total, mask, rl} <= set(nas.COMPARISONS)
    assert nas.controller_label("random").startswith("none") and nas.controller_label("rl").startswith("sound")
    assert nas.controller_label("rl_faithful_masked").startswith("faithful")
    assert nas.learned_strategies(["random", "rl_faithful", "rl"]) == ["rl_faithful", "rl"]


def varied_evaluate(archs, child_seeds, data_seed):
    """Rewards that differ from group to group (data_seed is the group), so baseline timing shows."""
    return [{"val_acc": 0.5 + 0.03 * (data_seed % 7) + 0.001 * a[0]["filters"] / 16, "params": 0} for a in archs]


@pytest.mark.parametrize("strategy", ["rl", "rl_masked"])
def test_advantage_uses_the_baseline_before_this_groups_rewards(strategy):
    """b_0 = mean(R_0); A_g = R_g - b_g; b_(g+1) = decay * b_g + (1 - decay) * mean(R_g)."""
    cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=15, children_per_update=3, lam=0.0,
                           controller=nas.ControllerConfig(baseline_decay=0.8))
    df = nas.run_search(strategy, 2, cfg, varied_evaluate, log=None)
    groups = [df.iloc[i:i + 3] for i in range(0, 15, 3)]
    expected = None
    for g in groups:
        r = torch.tensor(g["rl/reward"].tolist())
        expected = update_baseline(None, r, cfg.controller.baseline_decay) if expected is None else expected
        assert (g["rl/baseline"] == float(expected)).all()
        assert g["rl/advantage"].to_numpy() == pytest.approx((r - expected).numpy(), abs=1e-7)
        expected = update_baseline(expected, r, cfg.controller.baseline_decay)
    assert groups[1]["rl/baseline"].iloc[0] != groups[2]["rl/baseline"].iloc[0]   # b_1 = b_0 = mean(R_0)


def test_champions_are_the_highest_reward_first_on_ties():
    eps = pd.DataFrame({"strategy": ["rl"] * 4 + ["random"] * 3, "seed": [0, 0, 0, 1, 0, 0, 0],
                        "episode": [1, 2, 3, 1, 1, 2, 3], "arch": list("abcdefg"),
                        "reward": [0.2, 0.9, 0.9, 0.1, 0.5, 0.3, 0.4]})
    champs = nas.champions(eps).set_index(["strategy", "seed"])
    assert champs.loc[("rl", 0), "arch"] == "b"          # the best, and the first of two equal ones
    assert champs.loc[("rl", 1), "arch"] == "d"
    assert champs.loc[("random", 0), "arch"] == "e"
    assert (champs["reward"] == eps.groupby(["strategy", "seed"])["reward"].max().reindex(champs.index)).all()


@pytest.mark.parametrize("strategy", ["rl_masked", "random_masked"])
def test_two_layer_masked_search_applies_the_rules_per_layer(strategy):
    rules = ["filters == 128", "kernel == 5 and filters >= 64"]
    space = nas.SearchSpace(layers=2)
    per_layer = 24 - 6 - 3                                    # no 128 filters; no 5x5 with 64 filters
    cands = space.all_indices(rules)
    assert len(cands) == per_layer ** 2
    archs = [space.decode(c) for c in cands]
    assert any(a[0]["kernel"] == 5 and a[1]["filters"] == 64 for a in archs)    # across layers: allowed
    cfg = nas.SearchConfig(space=space, episodes=12, children_per_update=4, mask_rules=rules)
    df = nas.run_search(strategy, 0, cfg, fake_evaluate, log=None)
    for layer in ("l0", "l1"):
        assert (df[f"{layer}.filters"] != 128).all()
        assert not ((df[f"{layer}.kernel"] == 5) & (df[f"{layer}.filters"] >= 64)).any()


def test_generic_stats_and_sentences():
    df = pd.DataFrame({"method": ["ens"] * 3 + ["avg"] * 3, "fold": [0, 1, 2] * 2,
                       "acc": [0.81, 0.83, 0.86, 0.80, 0.81, 0.83]})
    row = stats.paired_comparison(df, "ens", "avg", "acc", by="method", unit="fold")
    assert row["n_folds"] == 3 and row["mean_diff"] == pytest.approx(0.02) and 0 < row["p"] < 1
    table = stats.compare_pairs(df, [("ens", "avg"), ("ens", "cutout")], "acc", by="method", unit="fold")
    assert list(zip(table["a"], table["b"])) == [("ens", "avg")]
    text = report.comparison_sentence(row, "Test ACC", unit="fold")
    assert text.startswith("Test ACC 0.8333 vs 0.8133 (difference +0.0200; paired t-test over 3 folds: t = ")
    assert "little power" in report.power_note(3, "fold") and report.power_note(5) == ""
    assert stats.holm([0.01, 0.04, float("nan"), 0.03]) == pytest.approx([0.03, 0.06, float("nan"), 0.06], nan_ok=True)


# ------------------------------------------------------------------------------- rules --
SPACE = {"filters": [16, 32, 64, 128], "kernel": [3, 5], "dropout": [0.1, 0.25, 0.5]}
RULES = ["filters == 128", "kernel == 5 and filters >= 64"]


def test_rule_parsing_and_evaluation():
    r = parse_rule("kernel == 5 and filters >= 64", SPACE)
    assert r.names == {"kernel", "filters"}
    assert r({"kernel": 5, "filters": 64}) is True
    assert r({"kernel": 3, "filters": 64}) is False
    assert parse_rule("filters in [16, 32]", SPACE)({"filters": 16})
    assert parse_rule("filters not in (16, 32)", SPACE)({"filters": 64})
    assert parse_rule("filters in {16, 32}", SPACE)({"filters": 32})
    assert parse_rule("16 < filters <= 64", SPACE)({"filters": 64})
    assert not parse_rule("16 < filters <= 64", SPACE)({"filters": 16})
    assert parse_rule("not (dropout > 0.2) or kernel != 3", SPACE)({"dropout": 0.1, "kernel": 3})
    assert not parse_rule("dropout > -1 and not kernel == 3", SPACE)({"dropout": 0.1, "kernel": 3})
    with pytest.raises(ValueError, match="could not be evaluated"):
        parse_rule("filters < 'a'", SPACE)({"filters": 16})
    with pytest.raises(ValueError, match="needs decisions"):
        r({"kernel": 5})


@pytest.mark.parametrize(
    "rule,what",
    [
        ("__import__('os')", "function call"),
        ("filters.__class__ == 1", "attribute access"),
        ("().__class__.__bases__", "attribute access"),
        ("filters + 1 == 2", "arithmetic"),
        ("[x for x in filters]", "comprehension"),
        ("filters[0] == 1", "subscript"),
        ("filters == None", "None"),
        ("(lambda: 1)() == 1", "call"),
        ("filters in [kernel]", "only constants"),
        ("-filters == -16", "unary operator"),
        ("filters is 16", "comparison operator Is"),
    ],
)
def test_forbidden_constructs_rejected(rule, what):
    with pytest.raises(ValueError) as e:
        parse_rule(rule, SPACE)
    msg = str(e.value)
    assert rule in msg and "not allowed" in msg and what in msg


def test_unknown_decision_and_bad_rules():
    with pytest.raises(ValueError, match="unknown decision 'width'") as e:
        nas.SearchSpace().parse_rules(["width == 3"])
    assert "filters" in str(e.value) and "kernel" in str(e.value)
    with pytest.raises(ValueError, match="not a valid expression"):
        parse_rule("filters ==", SPACE)
    with pytest.raises(ValueError, match="mentions no decision"):
        parse_rule("1 == 1", SPACE)
    with pytest.raises(ValueError, match="unknown decision 'os'"):
        allowed({"filters": 16}, ["os == 1"])
    with pytest.raises(ValueError, match="unknown decision 'filters'; valid decisions are \\['width'\\]"):
        parse_rule(parse_rule("filters == 16", SPACE), ["width"])      # a parsed rule in another space


def test_allowed():
    assert allowed({"filters": 32, "kernel": 5, "dropout": 0.1}, RULES)
    assert not allowed({"filters": 64, "kernel": 5, "dropout": 0.1}, RULES)
    assert not allowed({"filters": 128, "kernel": 3, "dropout": 0.1}, RULES)
    assert allowed({"filters": 64, "kernel": 3, "dropout": 0.1}, RULES)


def test_sequential_mask():
    rules = nas.parse_rules(RULES, SPACE)                             # parsed once, used at every step
    assert sequential_mask(SPACE, rules, {}, "kernel").tolist() == [True, True]
    assert sequential_mask(SPACE, rules, {"kernel": 5}, "filters").tolist() == [True, True, False, False]
    assert sequential_mask(SPACE, rules, {"kernel": 3}, "filters").tolist() == [True, True, True, False]
    assert sequential_mask(SPACE, rules, {}, "filters").tolist() == [True, True, True, False]
    assert sequential_mask(SPACE, rules, {"filters": 64}, "kernel").tolist() == [True, False]
    assert sequential_mask(SPACE, rules, {"filters": 16, "kernel": 5}, "dropout").tolist() == [True] * 3
    with pytest.raises(ValueError, match="unknown decision"):
        sequential_mask(SPACE, rules, {"width": 1}, "kernel")
    with pytest.raises(ValueError, match="already chosen"):
        sequential_mask(SPACE, rules, {"kernel": 3}, "kernel")
    with pytest.raises(ValueError, match="no value of decision 'kernel'"):
        sequential_mask(SPACE, ["kernel in [3, 5]"], {}, "kernel")


def test_sequential_mask_sampling_only_yields_allowed_archs():
    rules = RULES + ["dropout == 0.5 and kernel == 3", "filters == 16 and dropout != 0.1"]
    order = ["filters", "kernel", "dropout"]
    all_allowed = {arch for arch in itertools.product(*(SPACE[k] for k in order))
                   if allowed(dict(zip(order, arch)), rules)}
    torch.manual_seed(0)
    policies = {k: CategoricalPolicy(len(SPACE[k])) for k in order}
    parsed = nas.parse_rules(rules, SPACE)
    seen = set()
    for _ in range(300):
        chosen = {}
        for k in order:
            idx = int(policies[k](sequential_mask(SPACE, parsed, chosen, k)).sample())
            chosen[k] = SPACE[k][idx]
        seen.add(tuple(chosen[k] for k in order))
    assert seen == all_allowed  # only allowed archs, and every one of them is reachable


def test_search_all_reuses_a_stored_search_and_redoes_it_for_another_config(tmp_path):
    from helpers.results import Recorder

    calls = []

    def counting(archs, child_seeds, data_seed):
        calls.append(len(archs))
        return fake_evaluate(archs, child_seeds, data_seed)

    rec = Recorder(tmp_path / "r")
    cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=4, children_per_update=2)
    first = nas.search_all(rec, ["random", "rl"], [0], cfg, counting, log=None)
    n = len(calls)
    again = nas.search_all(rec, ["random", "rl"], [0], cfg, counting, log=None)
    assert len(calls) == n  # stored units are not redone
    pd.testing.assert_frame_equal(first, again)
    other = nas.SearchConfig(space=nas.SearchSpace(), episodes=6, children_per_update=2)
    redone = nas.search_all(rec, ["random"], [0], other, counting, log=None)
    assert len(calls) > n and redone["episode"].max() == 6


# --------------------------------------------------------------- issue 10: what the page states --
def _row(a, b, metric, diff, p, p_holm, summary="last", mean_b=0.80):
    return {"a": a, "b": b, "metric": metric, "summary": summary, "last": 10 if summary == "last" else None,
            "n_seeds": 3, "mean_a": mean_b + diff, "mean_b": mean_b, "mean_diff": diff, "sd_diff": 0.01,
            "t": 3.0, "p": p, "p_holm": p_holm}


def test_decomposition_says_the_mask_explains_most_of_the_gain():
    """rl_masked vs random +0.067 (p .038): random_masked vs random +0.063, rl_masked vs random_masked +0.004."""
    tests = pd.DataFrame([_row("rl_masked", "random", "reward", 0.067, 0.038, 0.152),
                          _row("random_masked", "random", "reward", 0.063, 0.030, 0.150),
                          _row("rl_masked", "random_masked", "reward", 0.004, 0.64, 1.0)])
    text = nas.describe_decomposition(tests)
    assert text.count("\n") == 0 and text.startswith("- On mean reward over the last 10 episodes, rl_masked vs random")
    assert "+0.0670 (Holm-adjusted p = 0.152)" in text
    assert "mask alone (random_masked vs random) accounts for +0.0630 (Holm-adjusted p = 0.150)" in text
    assert "(rl_masked vs random_masked) for +0.0040 (Holm-adjusted p = 1.000)" in text
    assert "94% of the difference is the mask and 6% learning, so the mask explains most of it" in text
    # learning explaining most; parts of opposite signs: no shares
    flip = tests.assign(mean_diff=[0.05, 0.01, 0.04], metric="val_acc")
    assert "20% of the difference is the mask and 80% learning, so learning explains most of it" in \
        nas.describe_decomposition(flip)
    assert "On mean val accuracy over" in nas.describe_decomposition(flip)
    opposite = tests.assign(mean_diff=[0.01, 0.03, -0.02])
    assert "no shares are given" in nas.describe_decomposition(opposite)
    assert nas.describe_decomposition(tests.iloc[:2]) == ""          # a part missing: no sentence


def test_paired_tests_cover_three_metrics_with_holm_per_metric():
    rows = []
    for strategy, shift in (("random", 0.0), ("random_masked", 0.02), ("rl_masked", 0.025), ("rl", 0.001)):
        for seed in range(3):
            cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=6, children_per_update=2)
            df = nas.run_search("random", seed, cfg, fake_evaluate, log=None)
            df["reward"] += shift + 0.002 * seed * (strategy != "random")
            df["val_acc"] += shift / 2 + 0.001 * ((seed + len(strategy)) % 3)
            rows.append(df.assign(strategy=strategy, seed=seed))
    eps = pd.concat(rows, ignore_index=True)
    tests = nas.paired_tests(eps, last=3)
    pairs = [("rl", "random"), ("rl_masked", "random_masked"), ("rl_masked", "random"), ("random_masked", "random")]
    assert list(zip(tests["a"], tests["b"]))[:4] == pairs                 # only the pairs that ran, in order
    assert list(tests.groupby(["metric", "summary"], sort=False).size().items()) == [
        (("reward", "last"), 4), (("reward", "best"), 4), (("val_acc", "last"), 4), (("params", "last"), 4)]
    for metric, part in tests.groupby("metric"):
        assert part["p_holm"].to_numpy() == pytest.approx(stats.holm(part["p"]), nan_ok=True)
    assert (tests["p_holm"].dropna() >= tests.loc[tests["p_holm"].notna(), "p"]).all()
    text = nas.describe_tests(tests)
    assert text.count("- **") == 4
    assert "Mean reward over the last 3 episodes" in text and "Best reward found" in text
    assert "Mean val accuracy over the last 3 episodes" in text and "Mean parameters over the last 3 episodes" in text
    assert "Holm-adjusted p = " in text and "after Holm's correction" in text
    params_sentence = text.split("Mean parameters")[1].split(")")[0]
    assert "reward" not in params_sentence and "," in params_sentence      # parameters as counts: 12,345
    assert "the mask explains" in nas.describe_decomposition(tests) or "learning explains" in nas.describe_decomposition(tests)


def test_sentences_name_their_metric_and_judge_on_holm():
    row = _row("rl", "random", "val_acc", 0.01, 0.02, 0.08)
    assert "significant at 0.05" in report.verdict({**row, "p_holm": float("nan")})
    v = report.verdict(row)
    assert "p = 0.020, Holm-adjusted p = 0.080, not significant at 0.05 after Holm's correction" in v
    last, best = pd.DataFrame([row]), pd.DataFrame([{**row, "summary": "best"}])
    text = nas.describe_comparison(last, best)
    assert "mean val accuracy over the last 10 episodes" in text and "Best val accuracy found" in text
    assert "reward" not in text


def test_a_difference_that_rounds_to_zero_is_never_written_minus_zero():
    assert report.signed(-0.0002) == "+0.000" and report.signed(-0.0006) == "-0.001"
    assert report.signed(-0.00004, "{:+.4f}") == "+0.0000" and report.signed(0.25, "{:+.1%}") == "+25.0%"
    row = {**_row("rl", "random", "val_acc", -0.00001, 0.9, float("nan")), "mean_a": 0.5, "mean_b": 0.5}
    assert "difference +0.0000;" in report.comparison_sentence(row, "x")


def test_val_test_sentence():
    champ = pd.DataFrame({"val/acc": [0.95, 0.94], "test/acc": [0.75, 0.74]})
    note = nas.val_test_note(champ)
    assert note.startswith("The 2 champions (mean over strategies and seeds): val accuracy 0.945 overstates test accuracy 0.745 by 0.200")
    assert "does not overstate" in report.val_test_sentence(0.80, 0.82, "x")


def test_the_baselines_sentence_says_whether_baselines_are_beside_the_champions():
    base = pd.DataFrame({"flag": ["organamnist", "organamnist", "pneumoniamnist"], "model": ["cnn", "resnet", "cnn"]})
    assert "baselines page's models on organamnist (cnn, resnet)" in nas.baselines_note(base, "organamnist")
    for empty in (base[base["flag"] == "x"], pd.DataFrame()):
        assert "champions only" in nas.baselines_note(empty, "organamnist")


def test_entropy_bonus_is_not_applied_to_the_faithful_strategies():
    def run(strategy, coef):
        cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=8, children_per_update=2,
                               controller=nas.ControllerConfig(entropy_coef=coef))
        return nas.run_search(strategy, 0, cfg, varied_evaluate, log=None)
    for strategy in ("rl_faithful", "rl_faithful_masked"):
        pd.testing.assert_frame_equal(run(strategy, 0.0), run(strategy, 0.5))
    assert not run("rl", 0.0)["arch"].equals(run("rl", 0.5)["arch"]) or \
        not run("rl", 0.0)["p/filters=16"].equals(run("rl", 0.5)["p/filters=16"])


def test_faithful_masked_is_masked_without_a_baseline():
    cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=12, children_per_update=3)
    df = nas.run_search("rl_faithful_masked", 0, cfg, varied_evaluate, log=None)
    assert (df["filters"] != 128).all() and (df["rl/baseline"] == 0.0).all()
    assert df["rl/advantage"].to_numpy() == pytest.approx(df["rl/reward"].to_numpy(), abs=1e-6)
    assert df["p/filters=128"].max() < 1e-6


def test_first_advantage_is_zero_with_one_child_per_update():
    """As the page says: the baseline starts at the first reward, so the first update does nothing."""
    cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=3, children_per_update=1)
    df = nas.run_search("rl", 0, cfg, varied_evaluate, log=None)
    assert df["rl/advantage"].iloc[0] == 0.0 and df["rl/advantage"].iloc[1] != 0.0


def test_beside_published_labels_every_row_with_its_controller():
    rows = []
    for strategy in ("random", "rl", "rl_faithful", "random_masked"):
        cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=4, children_per_update=2)
        rows.append(nas.run_search("random", 0, cfg, fake_evaluate, log=None).assign(strategy=strategy, seed=0))
    eps = pd.concat(rows, ignore_index=True)
    table = nas.beside_published(eps, "ours")
    assert list(zip(table["phase"], table["strategy"])) == [
        ("random", "random"), ("random", "random"), ("rl", "rl"), ("rl", "rl_faithful"), ("rl", "rl"),
        ("rl_masked", "rl_masked"), ("(none published)", "random_masked")]
    assert list(table["source"])[:5] == ["RLMedNAS (published)", "ours: like for like", "RLMedNAS (published)",
                                         "ours: like for like", "ours: sound controller"]
    assert table["controller"].notna().all()
    assert (table.loc[table["source"] == "RLMedNAS (published)", "controller"].str.split(":").str[0]
            == ["none (uniform sampling)", "faithful", "faithful"]).all()
    assert "controller" in nas.with_controller(nas.phase_table(eps)).columns


def test_differences_shared_picks_probability_note_and_engine_table():
    cfg = nas.SearchConfig(space=nas.SearchSpace(), episodes=6, children_per_update=1)

    def evaluate(archs, seeds, data_seed):
        return [dict(r, engine_path="fast: C kernels, fused step", kernels_loaded=True) for r in fake_evaluate(archs, seeds, data_seed)]

    eps = pd.concat([nas.run_search(s, 0, cfg, evaluate, log=None).assign(strategy=s, seed=0)
                     for s in ("rl", "rl_faithful", "random")], ignore_index=True)
    same = nas.shared_picks(eps, "rl", "rl_faithful")
    x, y = (eps[eps["strategy"] == s]["arch"].to_numpy() for s in ("rl", "rl_faithful"))
    assert same == pytest.approx((x == y).mean()) and math.isnan(nas.shared_picks(eps, "rl", "rl_masked"))
    params = {"children_per_update": 1, "episodes": 6, "seeds": [0], "max_train": None, "child": {"epochs": 5}}
    diff = nas.reference_differences(params, 6491, ["random", "rl", "rl_faithful"], eps).set_index("what")
    assert diff.loc["val images scored", "reference (RLMedNAS)"].startswith("6,400")
    assert diff.loc["val images scored", "this run"] == "all 6,491"
    assert diff.loc["controller updates", "this run"] == "one per 1 child(ren): 6 per search of 6 children"
    assert f"{same:.0%} of episodes" in diff.loc["sampling stream", "this run"]
    assert nas.updates_per_search(30, 5) == 6 and nas.updates_per_search(100, 4) == 25
    note = nas.probability_note(eps, ["rl", "rl_faithful", "random"], cfg)
    assert note.count("after 6 controller updates") == 2 and "random" not in note
    state = torch.random.get_rng_state()
    nas.probability_note(eps, ["rl"], cfg)
    assert torch.equal(state, torch.random.get_rng_state())             # the global RNG is left alone
    table = nas.engine_table(eps)
    assert set(table["engine_path"]) == {"fast: C kernels, fused step"} and table["children"].sum() == 18
    assert nas.engine_table(eps.drop(columns=["engine_path", "kernels_loaded"]))["engine_path"].eq("not recorded").all()


def test_champions_keep_the_childrens_precision():
    def cfg(precision):
        return nas.SearchConfig.from_params({"space": SPACE, "episodes": 1, "children_per_update": 1, "lam": 1e-6,
                                             "child": {"precision": precision, "lr": 0.002}})
    fp32 = nas.champion_fit_config(cfg("fp32"), {"epochs": 1})
    assert fp32.amp is False and fp32.lr == 0.002 and fp32.epochs == 1
    assert nas.champion_fit_config(cfg("bf16"), {}).amp is True
    assert nas.champion_fit_config(cfg("fp32"), {"amp": True}).amp is True     # an explicit choice wins


def test_champions_are_retrained_at_the_datasets_image_size(tmp_path, make_npz, monkeypatch):
    """A 64 px (RGB) flag: the champion's head must be sized for the dataset's images, not for 28 px."""
    from helpers import data
    from helpers.results import Recorder
    from helpers.train import FitConfig

    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    make_npz(tmp_path, "dermamnist", size=64, n=(24, 8, 8))
    ds = data.load("dermamnist", 64, tmp_path, verify=False, download=False)
    episodes = pd.DataFrame({"strategy": ["random"], "seed": [0], "episode": [1], "reward": [0.5],
                             "arch": ["f16-k3-d0.25"]})
    cfg = FitConfig(epochs=1, schedule="none", monitor="val/acc", progress="none")
    champ = nas.retrain_champions(Recorder(tmp_path / "r"), ds, episodes, cfg, batch_size=8, device="cpu")
    assert len(champ) == 1 and 0 <= champ["test/acc"].iloc[0] <= 1


def test_wall_sentence_totals_per_profile_and_device_and_names_the_longest_run():
    runs = pd.DataFrame({"notebook": ["apga", "noise", "folds", "nas"], "run": ["apga", "noise", "folds", "nas_full"],
                         "profile": ["quick", "quick", "quick", "full"], "device": ["CPU x2"] * 4,
                         "wall_s": [100.0, 250.0, None, 9127.0]})
    assert report.wall_sentence(runs) == ("quick on CPU x2: 5.8 min (350 s) over 2 runs, the longest noise/noise 250 s; "
                                          "full on CPU x2: 152.1 min (9,127 s) over 1 run, the longest nas/nas_full 9,127 s")
    assert report.wall_sentence(runs.iloc[:0]) == "no timed runs stored"
