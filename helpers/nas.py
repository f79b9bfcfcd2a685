"""RL architecture search (after RLMedNAS; Zoph & Le, ICLR 2017): controller, strategies, search loop.

An architecture is a list of per-layer dicts ``{"filters": 16, "kernel": 3, "dropout": 0.5}``; the
child network and its training live in :mod:`helpers.nas_engine`. Here:

* :class:`SearchSpace`: decisions (a list of choices each) repeated over ``layers``.
* :class:`Controller`: an LSTM that emits one token per decision, each step fed the embedding of
  the previous token (autoregressive). ``faithful=True`` is the reference controller instead: one
  LSTM step on a constant zero input with independent heads, i.e. a learned bias per decision.
* :func:`run_search`: one strategy and seed; ``random`` and ``random_masked`` sample uniformly
  (equal-budget non-RL controls), ``rl`` / ``rl_masked`` / ``rl_faithful`` train the controller with
  REINFORCE on ``R = val_acc - lam * params`` using a moving-average baseline (none when faithful,
  as in the reference code). Masked strategies forbid configurations given as rules in params.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from . import nas_engine  # registers the "nas_child" model, which champions are built from
from .repro import resolve_device
from .rl import advantages, reinforce_loss, rl_metrics, sequential_mask, update_baseline
from .rl.policies import masked_logits

DEFAULT_SPACE = {"filters": [16, 32, 64, 128], "kernel": [3, 5], "dropout": [0.1, 0.25, 0.5]}
STRATEGIES = ("random", "random_masked", "rl", "rl_masked", "rl_faithful")


@dataclass
class SearchSpace:
    """Decisions (name -> list of choices), the same for each of ``layers`` conv layers."""

    decisions: Mapping[str, Sequence[Any]] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    layers: int = 1

    def __post_init__(self):
        self.decisions = {k: list(v) for k, v in self.decisions.items()}
        missing = {"filters", "kernel", "dropout"} - set(self.decisions)
        if missing:
            raise ValueError(f"search space needs decisions {sorted(missing)}; got {list(self.decisions)}")

    @property
    def tokens(self) -> list[tuple[int, str]]:
        """(layer, decision) in emission order."""
        return [(layer, name) for layer in range(self.layers) for name in self.decisions]

    def n_choices(self) -> list[int]:
        return [len(self.decisions[name]) for _, name in self.tokens]

    def decode(self, indices: Sequence[int]) -> list[dict]:
        """Token indices -> architecture (list of per-layer dicts)."""
        arch = [dict() for _ in range(self.layers)]
        for (layer, name), i in zip(self.tokens, indices):
            arch[layer][name] = self.decisions[name][int(i)]
        return arch

    def mask(self, rules: Sequence[str], chosen_idx: Sequence[int]) -> torch.Tensor:
        """Allowed choices of the next token given the tokens chosen so far (rules apply per layer)."""
        t = len(chosen_idx)
        layer, name = self.tokens[t]
        if not rules:
            return torch.ones(len(self.decisions[name]), dtype=torch.bool)
        chosen = {n: self.decisions[n][int(i)] for (l, n), i in zip(self.tokens[:t], chosen_idx) if l == layer}
        return sequential_mask(self.decisions, rules, chosen, name)

    def all_indices(self, rules: Sequence[str] = ()) -> list[tuple[int, ...]]:
        """Every allowed architecture as token indices (for random search and exact marginals)."""
        out = []
        for combo in itertools.product(*[range(n) for n in self.n_choices()]):
            if all(bool(self.mask(rules, combo[:t])[combo[t]]) for t in range(len(combo))):
                out.append(combo)
        return out


class Controller(nn.Module):
    """LSTM controller emitting one token per decision (Zoph & Le 2017).

    Autoregressive: step ``t`` is fed the embedding of token ``t-1`` (a learned start vector at
    ``t = 0``), so later decisions can depend on earlier ones. ``faithful=True`` reproduces the
    reference code: a single LSTM step on a constant zero input shared by independent heads.
    """

    def __init__(self, space: SearchSpace, hidden: int = 100, embed: int = 32, faithful: bool = False):
        super().__init__()
        self.space, self.faithful = space, faithful
        sizes = space.n_choices()
        if faithful:
            self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, batch_first=True)
        else:
            self.cell = nn.LSTMCell(embed, hidden)
            self.start = nn.Parameter(torch.zeros(embed))
            self.embeds = nn.ModuleList(nn.Embedding(n, embed) for n in sizes)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in sizes)

    def _faithful_hidden(self, batch: int) -> torch.Tensor:
        out, _ = self.lstm(torch.zeros(batch, 1, 1))
        return out[:, -1]

    def step_logits(self, prev: torch.Tensor | None, state, t: int, batch: int):
        """Logits of token ``t`` given the previous token indices ``prev`` (B,) and LSTM ``state``."""
        if self.faithful:
            h = state if state is not None else self._faithful_hidden(batch)
            return self.heads[t](h), h
        x = self.start.expand(batch, -1) if t == 0 else self.embeds[t - 1](prev)
        h, c = self.cell(x, state)
        return self.heads[t](h), (h, c)

    def sample(self, n: int, rules: Sequence[str] = (), generator: torch.Generator | None = None):
        """Sample ``n`` architectures. Returns (indices (n, T), log_prob (n,), entropy (n,)), with grad."""
        idx = torch.zeros(n, len(self.space.tokens), dtype=torch.long)
        log_prob, entropy = torch.zeros(n), torch.zeros(n)
        state, prev = None, None
        for t in range(len(self.space.tokens)):
            logits, state = self.step_logits(prev, state, t, n)
            masks = torch.stack([self.space.mask(rules, idx[i, :t].tolist()) for i in range(n)])
            dist = torch.distributions.Categorical(logits=masked_logits(logits, masks))
            cdf = dist.probs.detach().cumsum(1)
            u = torch.rand(n, 1, generator=generator) * cdf[:, -1:]
            last_allowed = (masks.long() * torch.arange(masks.shape[1])).max(1).values
            a = torch.minimum((cdf < u).sum(1), last_allowed)  # never a masked index, even on rounding
            idx[:, t] = a
            log_prob = log_prob + dist.log_prob(a)
            entropy = entropy + dist.entropy()
            prev = a
        return idx, log_prob, entropy

    def log_prob(self, indices: torch.Tensor, rules: Sequence[str] = ()) -> torch.Tensor:
        """Log-probability of given token sequences (teacher forcing, masks as in sampling)."""
        n = indices.shape[0]
        total = torch.zeros(n)
        state, prev = None, None
        for t in range(indices.shape[1]):
            logits, state = self.step_logits(prev, state, t, n)
            if rules:
                masks = torch.stack([self.space.mask(rules, indices[i, :t].tolist()) for i in range(n)])
                logits = masked_logits(logits, masks)
            total = total + torch.log_softmax(logits, 1).gather(1, indices[:, t:t + 1]).squeeze(1)
            prev = indices[:, t]
        return total

    @torch.no_grad()
    def marginals(self, rules: Sequence[str] = (), candidates: list[tuple[int, ...]] | None = None) -> dict[str, float]:
        """Exact probability of each (layer, decision, value) under the controller, by enumeration."""
        cands = candidates if candidates is not None else self.space.all_indices(rules)
        idx = torch.tensor(cands, dtype=torch.long)
        p = self.log_prob(idx, rules).exp()
        out = {}
        for t, (layer, name) in enumerate(self.space.tokens):
            for v_i, value in enumerate(self.space.decisions[name]):
                key = f"p/{name}={value}" if self.space.layers == 1 else f"p/l{layer}.{name}={value}"
                out[key] = float(p[idx[:, t] == v_i].sum())
        return out


@dataclass
class SearchConfig:
    """Everything one search needs; built from notebook params by :func:`SearchConfig.from_params`."""

    space: SearchSpace
    episodes: int = 100
    children_per_update: int = 1
    lam: float = 1e-6
    mask_rules: Sequence[str] = ("filters == 128",)   # forbidden configurations (see helpers.rl.masking)
    controller_hidden: int = 100
    controller_lr: float = 0.01
    baseline_decay: float = 0.9
    entropy_coef: float = 0.0
    child: Mapping[str, Any] = field(default_factory=dict)   # passed to nas_engine.train_children


def reward(val_acc: float, params: int, lam: float) -> float:
    """The search reward ``R = val_acc - lam * params``."""
    return float(val_acc) - lam * float(params)


def run_search(strategy: str, seed: int, cfg: SearchConfig, evaluate, log=print, log_every: int = 10) -> pd.DataFrame:
    """One search: ``cfg.episodes`` children chosen by ``strategy``; one row per child.

    ``evaluate(archs, child_seeds, data_seed) -> list[dict(val_acc, params, ...)]`` trains and
    scores a group of children (see :func:`helpers.nas_engine.train_children`). Child ``e`` of seed
    ``s`` gets init seed ``s * 100_000 + e`` and group ``g`` data order ``s * 1000 + g`` whatever the
    strategy, so strategies that pick the same architecture at the same episode get the same reward.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'; valid: {', '.join(STRATEGIES)}")
    masked = strategy.endswith("masked")
    rules = list(cfg.mask_rules) if masked else []
    rl = strategy.startswith("rl")
    faithful = strategy == "rl_faithful"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    controller = Controller(cfg.space, cfg.controller_hidden, faithful=faithful) if rl else None
    opt = torch.optim.Adam(controller.parameters(), lr=cfg.controller_lr) if rl else None
    candidates = cfg.space.all_indices(rules)
    baseline = None
    rows: list[dict] = []
    k = max(1, cfg.children_per_update)
    for group, start in enumerate(range(0, cfg.episodes, k)):
        n = min(k, cfg.episodes - start)
        if rl:
            idx, logp, ent = controller.sample(n, rules, gen)
        else:
            pick = torch.randint(len(candidates), (n,), generator=gen)
            idx = torch.tensor([candidates[i] for i in pick.tolist()], dtype=torch.long)
            logp, ent = None, None
        archs = [cfg.space.decode(row) for row in idx.tolist()]
        results = evaluate(archs, [seed * 100_000 + start + i for i in range(n)], seed * 1000 + group)
        rewards = [reward(res["val_acc"], res["params"], cfg.lam) for res in results]
        r = torch.tensor(rewards)
        metrics: dict[str, Any] = {}
        if rl:
            if faithful:
                adv = advantages(r, None)          # the reference has no baseline
            else:
                if baseline is None:
                    baseline = update_baseline(None, r, cfg.baseline_decay)
                adv = advantages(r, baseline)
            loss = reinforce_loss(logp, adv, ent, cfg.entropy_coef)
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics = rl_metrics(r, baseline if not faithful else 0.0, adv, ent)
            if not faithful:
                baseline = update_baseline(baseline, r, cfg.baseline_decay)
            probs = controller.marginals(rules, candidates)
        else:
            probs = {}
        for i, (arch, res) in enumerate(zip(archs, results)):
            row = {"episode": start + i + 1, "arch": arch_key(arch), **_flat(arch), "params": res["params"],
                   "val_acc": res["val_acc"], "reward": rewards[i], "child_s": res.get("train_s", float("nan")),
                   "cached": bool(res.get("cached", False))}
            if rl:
                row.update({"rl/reward": rewards[i], "rl/baseline": metrics["rl/baseline"],
                            "rl/advantage": float(adv[i]), "rl/entropy": float(ent[i].detach()),
                            "rl/log_prob": float(logp[i].detach()), "rl/loss": float(loss.detach())})
            row.update(probs)
            rows.append(row)
        if log and (group % log_every == 0 or start + n >= cfg.episodes):
            last = rows[-1]
            log(f"{strategy} seed {seed} episode {last['episode']:>4}/{cfg.episodes}  reward {float(r.mean()):.4f}"
                f"  val_acc {np.mean([x['val_acc'] for x in results]):.4f}")
    return pd.DataFrame(rows)


def arch_key(arch: Sequence[Mapping[str, Any]]) -> str:
    """Readable identifier of an architecture, e.g. ``f16-k3-d0.5`` (layers joined by ``|``)."""
    return "|".join(f"f{l['filters']}-k{l['kernel']}-d{l['dropout']}" for l in arch)


def _flat(arch: Sequence[Mapping[str, Any]]) -> dict:
    if len(arch) == 1:
        return dict(arch[0])
    return {f"l{i}.{k}": v for i, layer in enumerate(arch) for k, v in layer.items()}


def phase_table(episodes: pd.DataFrame, by: Sequence[str] = ("strategy",)) -> pd.DataFrame:
    """The reference table: mean reward, params and val accuracy over the episodes of each phase."""
    return (episodes.groupby(list(by), sort=False)[["reward", "params", "val_acc"]].mean()
            .reset_index())


def champions(episodes: pd.DataFrame) -> pd.DataFrame:
    """Per (strategy, seed) the child with the best validation reward (first one on ties)."""
    best = episodes.sort_values(["strategy", "seed", "reward", "episode"], ascending=[True, True, False, True])
    return best.groupby(["strategy", "seed"], sort=False).head(1).reset_index(drop=True)


def paired_comparison(episodes: pd.DataFrame, a: str, b: str, metric: str = "reward",
                      last: int | None = None, reduce: str = "mean") -> dict:
    """Paired t-test over seeds of ``a`` vs ``b`` on the per-seed ``reduce`` (mean or max) of ``metric``.

    ``last`` restricts to the final ``last`` episodes (what the policy does after learning);
    ``reduce="max"`` compares the best child each search found.
    """
    from scipy import stats

    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', not {reduce!r}")
    df = episodes if last is None else episodes[episodes["episode"] > episodes["episode"].max() - last]
    per_seed = df.groupby(["strategy", "seed"])[metric].agg(reduce).unstack("strategy")
    pair = per_seed[[a, b]].dropna()
    diff = pair[a] - pair[b]
    out = {"a": a, "b": b, "metric": metric, "last": last, "n_seeds": len(pair),
           "mean_a": float(pair[a].mean()), "mean_b": float(pair[b].mean()),
           "mean_diff": float(diff.mean()), "sd_diff": float(diff.std(ddof=1)) if len(pair) > 1 else math.nan}
    if len(pair) > 1 and diff.std(ddof=1) > 0:
        t = stats.ttest_rel(pair[a], pair[b])
        out.update(t=float(t.statistic), p=float(t.pvalue))
    else:
        out.update(t=math.nan, p=math.nan)
    return out


# The comparisons on the NAS page: each RL variant against its equal-budget control, masked RL
# against unmasked random search, and the sound controller against the reference one.
COMPARISONS = (("rl", "random"), ("rl_masked", "random_masked"), ("rl_masked", "random"), ("rl", "rl_faithful"))


def compare_strategies(episodes: pd.DataFrame, last: int | None, pairs: Sequence[tuple[str, str]] = COMPARISONS,
                       metric: str = "reward") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired tests of every pair of ``pairs`` whose two strategies were run: on the mean ``metric``
    of the last ``last`` episodes, and on the best ``metric`` found. Returns ``(last, best)``."""
    ran = set(episodes["strategy"])
    pairs = [(a, b) for a, b in pairs if a in ran and b in ran]
    last_t = pd.DataFrame([paired_comparison(episodes, a, b, metric, last=last) for a, b in pairs])
    best_t = pd.DataFrame([paired_comparison(episodes, a, b, metric, reduce="max") for a, b in pairs])
    return last_t, best_t


def make_evaluator(ds, child: Mapping[str, Any], cache_path=None):
    """``evaluate(archs, child_seeds, data_seed)`` training children on ``ds`` train, scoring on val.

    ``child`` holds :func:`helpers.nas_engine.train_children` options (epochs, batch_size, lr,
    engine, precision, device). With ``cache_path`` results are cached by (architecture, seed,
    settings) and marked ``cached``; runs that opt in say so on their page.
    """
    cache = nas_engine.ChildCache(cache_path) if cache_path else None
    child = {**dict(child), "device": str(resolve_device(child.get("device", "auto")))}

    def evaluate(archs, child_seeds, data_seed):
        return nas_engine.train_children(archs, ds["train"], ds["val"], num_classes=ds.n_classes,
                                         in_chans=ds.n_channels, seeds=child_seeds, data_seed=data_seed,
                                         cache=cache, **dict(child))
    return evaluate


def search_all(recorder, strategies: Sequence[str], seeds: Sequence[int], cfg: SearchConfig, evaluate,
               log=print) -> pd.DataFrame:
    """Run every (strategy, seed) search, each stored as one unit (a finished one is not redone).

    Returns all episodes stacked, with ``strategy`` and ``seed`` columns.
    """
    import time

    for strategy in strategies:
        for seed in seeds:
            if recorder.has_unit(strategy=strategy, seed=seed):
                continue
            t0 = time.perf_counter()
            df = run_search(strategy, seed, cfg, evaluate, log)
            best = df.loc[df["reward"].idxmax()]
            recorder.save_unit({"strategy": strategy, "seed": seed},
                               {"mean_reward": df["reward"].mean(), "mean_params": df["params"].mean(),
                                "mean_val_acc": df["val_acc"].mean(), "best_reward": best["reward"],
                                "best_arch": best["arch"], "search_s": time.perf_counter() - t0,
                                "children": len(df), "cached_children": int(df["cached"].sum())},
                               history=df)
    episodes = recorder.histories()
    order = {s: i for i, s in enumerate(strategies)}
    return episodes.sort_values(["strategy", "seed", "episode"], key=lambda c: c.map(order) if c.name == "strategy" else c,
                                ignore_index=True)


def arch_from_key(key: str) -> list[dict]:
    """Inverse of :func:`arch_key`: ``"f16-k3-d0.5"`` -> ``[{"filters": 16, "kernel": 3, "dropout": 0.5}]``."""
    arch = []
    for layer in key.split("|"):
        f, k, d = layer.split("-")
        arch.append({"filters": int(f[1:]), "kernel": int(k[1:]), "dropout": float(d[1:])})
    return arch


def describe_comparison(last: pd.DataFrame, best: pd.DataFrame, alpha: float = 0.05) -> str:
    """Plain sentences from :func:`paired_comparison` tables (numbers come from the runs)."""
    lines = []
    for (_, a), (_, b) in zip(last.iterrows(), best.iterrows()):
        def verdict(row):
            if not np.isfinite(row["p"]):
                return "no test possible (fewer than two seeds or no variation)"
            sig = "significant" if row["p"] < alpha else "not significant"
            return f"paired t-test over {int(row['n_seeds'])} seeds: t = {row['t']:.2f}, p = {row['p']:.3f}, {sig} at {alpha}"
        span = f"the last {int(a['last'])} episodes" if a.get("last") is not None and np.isfinite(a["last"]) else "all episodes"
        lines.append(
            f"- **{a['a']} vs {a['b']}**: mean reward over {span} "
            f"{a['mean_a']:.4f} vs {a['mean_b']:.4f} (difference {a['mean_diff']:+.4f}; {verdict(a)}). "
            f"Best reward found {b['mean_a']:.4f} vs {b['mean_b']:.4f} ({verdict(b)}).")
    if len(last) and int(last["n_seeds"].max()) < 5:
        lines.append(f"- With {int(last['n_seeds'].max())} seeds these tests have little power: read the "
                     "differences and their spread, not only the p-values.")
    return "\n".join(lines)


def retrain_champions(recorder, ds, episodes: pd.DataFrame, cfg, *, batch_size: int = 128,
                      device: str = "auto") -> pd.DataFrame:
    """Retrain the champion of every (strategy, seed) with the shared ``fit`` and test it once.

    Units are stored under ``<run>/champions`` (a finished one is not retrained); returns one row
    per champion with its val and test metrics.
    """
    from .experiment import train_and_test
    from .results import Recorder

    champ_rec = Recorder(recorder.root / "champions")
    for _, row in champions(episodes).iterrows():
        train_and_test(champ_rec, ds, "nas_child", int(row["seed"]), cfg, batch_size=batch_size,
                       model_kwargs={"arch": arch_from_key(row["arch"])}, device=device,
                       unit={"strategy": row["strategy"], "seed": int(row["seed"]), "arch": row["arch"]})
    return champ_rec.wide_metrics()


def champions_beside_baselines(champ: pd.DataFrame, baselines: pd.DataFrame, flag: str) -> pd.DataFrame:
    """Test ACC/AUC (mean ± std over seeds) of the champions, then the baselines page's models on ``flag``."""
    from .experiment import summary_table

    cols = ["params", "test/acc", "test/auc"]
    table = summary_table(champ, ["strategy"], cols)
    if len(baselines):
        base = baselines[baselines["flag"] == flag].assign(strategy=lambda d: "baseline: " + d["model"])
        table = pd.concat([table, summary_table(base, ["strategy"], cols)], ignore_index=True)
    return table
