"""What a NAS page states about its own protocol: like-for-like rows beside the published table,
the differences from the reference, how the RL variants share a sampling stream, how far the
controllers moved, and which child engine measured each child."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..reference import RLMEDNAS_VAL_SCORED, rlmednas_table
from .analysis import phase_table
from .controller import Controller
from .strategies import CONTROLLERS, controller_label, get_strategy

__all__ = ["LIKE_FOR_LIKE", "beside_published", "updates_per_search", "reference_differences", "shared_picks",
           "probability_note", "engine_table"]

# published phase -> (our strategy with the reference's controller, our strategy with the sound one)
LIKE_FOR_LIKE = {"random": ("random", None), "rl": ("rl_faithful", "rl"), "rl_masked": ("rl_faithful_masked", "rl_masked")}


def beside_published(episodes: pd.DataFrame, source: str) -> pd.DataFrame:
    """Per published RLMedNAS phase: the published row, then ours with the same controller (the
    closest like-for-like line), then ours with the sound controller; strategies with no published
    phase last. Every row names its controller; strategies not run are left out."""
    ours = phase_table(episodes).set_index("strategy")
    rows = []
    for _, pub in rlmednas_table().iterrows():
        phase = pub["strategy"]
        rows.append({"phase": phase, "source": pub["source"], "strategy": phase,
                     "controller": CONTROLLERS["none" if phase == "random" else "faithful"],
                     **{k: pub[k] for k in ("reward", "params", "val_acc")}})
        for kind, name in zip(("like for like", "sound controller"), LIKE_FOR_LIKE[phase]):
            if name in ours.index:
                rows.append({"phase": phase, "source": f"{source}: {kind}", "strategy": name,
                             "controller": controller_label(name), **ours.loc[name].to_dict()})
    mapped = {n for pair in LIKE_FOR_LIKE.values() for n in pair if n}
    for name in ours.index:
        if name not in mapped:
            rows.append({"phase": "(none published)", "source": source, "strategy": name,
                         "controller": controller_label(name), **ours.loc[name].to_dict()})
    return pd.DataFrame(rows)


def updates_per_search(episodes: int, children_per_update: int) -> int:
    """Controller updates in one learned search of ``episodes`` children."""
    return math.ceil(episodes / max(1, children_per_update))


def shared_picks(episodes: pd.DataFrame, a: str, b: str) -> float:
    """Fraction of (seed, episode) at which strategies ``a`` and ``b`` picked the same architecture
    (NaN when either did not run)."""
    x = episodes[episodes["strategy"] == a].set_index(["seed", "episode"])["arch"]
    y = episodes[episodes["strategy"] == b].set_index(["seed", "episode"])["arch"]
    both = x.index.intersection(y.index)
    return float((x.loc[both] == y.loc[both]).mean()) if len(both) else math.nan


def reference_differences(params: Mapping, n_val: int, strategies: Sequence[str], episodes: pd.DataFrame) -> pd.DataFrame:
    """Where this run differs from the RLMedNAS reference (what, the reference, this run), from the
    run's own params and results."""
    k, n = int(params["children_per_update"]), int(params["episodes"])
    ctl = dict(params.get("controller") or {})
    faithful = [s for s in strategies if get_strategy(s).faithful]
    sound = [s for s in strategies if get_strategy(s).learns and not get_strategy(s).faithful]
    same = shared_picks(episodes, "rl", "rl_faithful")
    child = dict(params.get("child") or {})
    rows = [
        ("controller", "constant-input LSTM, no baseline",
         f"sound (autoregressive, baseline): {', '.join(sound) or 'none run'}; the reference's: "
         f"{', '.join(faithful) or 'none run'}"),
        ("controller updates", "one per child: 100 per phase",
         f"one per {k} child(ren): {updates_per_search(n, k)} per search of {n} children"),
        ("seeds", "one run", f"{len(params['seeds'])} seed(s), paired tests over seeds"),
        ("children", "5 epochs on all of train",
         f"{child.get('epochs', 5)} epoch(s) on {'all of train' if params.get('max_train') is None else str(params['max_train']) + ' train images'}"),
        ("val images scored", f"{RLMEDNAS_VAL_SCORED:,} (its val loader drops the last partial batch)",
         f"all {n_val:,}"),
        ("first advantage", "no baseline: the advantage is the reward",
         "the baseline starts at the first group's mean reward, so the first group's advantages sum to 0 "
         "(exactly 0 with one child per update: the first update does nothing)"),
        ("entropy bonus", "none", f"entropy_coef {ctl.get('entropy_coef', 0.0)} for the sound controller; none for the reference's"),
        ("sampling stream", "one search per phase",
         "all strategies of a seed draw from one Generator(seed) while child seeds are shared" +
         (f": rl and rl_faithful picked the same architecture in {same:.0%} of episodes" if np.isfinite(same) else "")),
    ]
    return pd.DataFrame(rows, columns=["what", "reference (RLMedNAS)", "this run"])


def probability_note(episodes: pd.DataFrame, strategies: Sequence[str], cfg) -> str:
    """Per learned strategy, the choice whose probability moved most (mean over seeds) from the
    initial controller (rebuilt from the search's seed, without touching the global RNG) to the last
    update, with the number of updates."""
    lines = []
    for name in strategies:
        spec = get_strategy(name)
        sub = episodes[episodes["strategy"] == name]
        cols = [c for c in sub.columns if c.startswith("p/")]
        if not spec.learns or not len(sub) or not cols:
            continue
        rules = cfg.space.parse_rules(cfg.mask_rules) if spec.masked else []
        start = []
        for seed in sorted(sub["seed"].unique()):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                ctrl = Controller(cfg.space, cfg.controller.hidden, faithful=spec.faithful)
                start.append(ctrl.marginals(rules, cfg.space.all_indices(rules)))
        before = pd.DataFrame(start)[cols].mean()
        after = sub[sub["episode"] == sub["episode"].max()][cols].mean()
        move = (after - before).abs()
        c = move.idxmax()
        updates = updates_per_search(int(sub["episode"].max()), cfg.children_per_update)
        lines.append(f"- **{name}**: after {updates} controller updates the largest move is "
                     f"P({c[2:]}) from {before[c]:.2f} to {after[c]:.2f} (mean over seeds).")
    return "\n".join(lines)


def engine_table(episodes: pd.DataFrame) -> pd.DataFrame:
    """Children per strategy, engine path and whether the C kernels loaded (as recorded with the episodes)."""
    cols = [c for c in ("engine_path", "kernels_loaded") if c in episodes]
    if not cols:
        return pd.DataFrame({"strategy": sorted(set(episodes["strategy"])), "engine_path": "not recorded",
                             "children": np.nan})
    df = episodes.assign(**{c: episodes[c].astype(object).where(episodes[c].notna(), "n/a") for c in cols})
    if "cached" in df:
        df.loc[df["cached"].astype(bool), cols] = "cached"
    return df.groupby(["strategy", *cols], sort=False).size().rename("children").reset_index()
