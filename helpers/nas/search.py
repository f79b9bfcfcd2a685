"""One search per (strategy, seed): children chosen, trained, rewarded; the controller updated.

:func:`run_search` draws every random number of a search from ``seed``: ``torch.manual_seed(seed)``
(the controller's init) and one ``Generator(seed)`` (its samples, or the uniform picks). Child
``e`` of seed ``s`` gets init seed ``s * 100_000 + e`` and group ``g`` data order ``s * 1000 + g``
whatever the strategy, so strategies that pick the same architecture at the same episode get the
same reward.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..repro import resolve_device, unit_code_digest
from ..rl import advantages, reinforce_loss, rl_metrics, update_baseline
from .cache import ChildCache
from .children import train_children
from .controller import Controller
from .space import SearchSpace, arch_key, flat_arch
from .strategies import get_strategy

__all__ = ["SearchConfig", "ControllerConfig", "ChildConfig", "reward", "run_search", "make_evaluator", "search_all"]


@dataclass
class ControllerConfig:
    """The controller and its REINFORCE update (a notebook's ``controller`` group)."""

    hidden: int = 100                 # LSTM width
    lr: float = 0.01                  # Adam
    baseline_decay: float = 0.9       # moving-average baseline b <- decay * b + (1 - decay) * mean(R)
    entropy_coef: float = 0.0         # entropy bonus in the loss (not for the faithful strategies)


@dataclass
class ChildConfig:
    """How each child is trained and scored (a notebook's ``child`` group; see :func:`train_children`)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    engine: str = "fast"              # fast | plain
    precision: str = "fp32"           # fp32 | bf16


@dataclass
class SearchConfig:
    """Everything one search needs. Build it from a notebook's params with :meth:`from_params`."""

    space: SearchSpace
    episodes: int = 100
    children_per_update: int = 1
    lam: float = 1e-6
    mask_rules: Sequence[str] = ("filters == 128",)   # forbidden configurations (see helpers.nas.rules)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    child: Mapping[str, Any] = field(default_factory=dict)   # ChildConfig fields and device, for train_children

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SearchConfig":
        """A config from a notebook's params (``space``, ``layers``, ``episodes``, ``children_per_update``,
        ``lam``, ``mask_rules``, the ``controller`` and ``child`` groups, ``device``), mirroring
        :meth:`helpers.train.FitConfig.from_params`: group keys and types are checked, unset ones
        keep the dataclass defaults. Other keys of ``params`` are ignored."""
        from ..config import check_group

        for group, schema in (("controller", ControllerConfig), ("child", ChildConfig)):
            check_group(group, dict(params.get(group) or {}), f"{__name__}:{schema.__name__}", "search config")
        child = asdict(ChildConfig(**dict(params.get("child") or {})))
        return cls(space=SearchSpace(params["space"], params.get("layers", 1)), episodes=params["episodes"],
                   children_per_update=params["children_per_update"], lam=params["lam"],
                   mask_rules=list(params.get("mask_rules") or ()),
                   controller=ControllerConfig(**dict(params.get("controller") or {})),
                   child={**child, "device": params.get("device", "auto")})


def reward(val_acc: float, params: int, lam: float) -> float:
    """The search reward ``R = val_acc - lam * params``."""
    return float(val_acc) - lam * float(params)


def run_search(strategy: str, seed: int, cfg: SearchConfig, evaluate, log=print, log_every: int = 10) -> pd.DataFrame:
    """One search: ``cfg.episodes`` children chosen by ``strategy``; one row per child.

    ``evaluate(archs, child_seeds, data_seed) -> list[dict(val_acc, params, ...)]`` trains and
    scores a group of children (see :func:`make_evaluator`). A learning strategy samples
    ``children_per_update`` children, then takes one REINFORCE step on their rewards with the
    advantage against the baseline *before* this group (none when faithful), then moves the baseline.

    Two properties the pages state: the baseline starts at the first group's mean reward, so the
    first advantages sum to zero (with one child per update the first advantage is exactly 0 and
    the first update does nothing); and every strategy of a seed draws from the same
    ``Generator(seed)``, so two strategies whose policies are still alike (``rl`` and
    ``rl_faithful`` near uniform) often pick the same architecture at the same episode.
    ``controller.entropy_coef`` is not applied to the faithful strategies (the reference had no
    entropy bonus). Rows carry the child engine's ``engine_path`` and ``kernels_loaded`` when the
    evaluator reports them.
    """
    spec = get_strategy(strategy)
    rules = cfg.space.parse_rules(cfg.mask_rules) if spec.masked else []
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ctl = cfg.controller
    controller = Controller(cfg.space, ctl.hidden, faithful=spec.faithful) if spec.learns else None
    opt = torch.optim.Adam(controller.parameters(), lr=ctl.lr) if spec.learns else None
    candidates = cfg.space.all_indices(rules)
    baseline = None
    rows: list[dict] = []
    k = max(1, cfg.children_per_update)
    for group, start in enumerate(range(0, cfg.episodes, k)):
        n = min(k, cfg.episodes - start)
        if spec.learns:
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
        if spec.learns:
            if spec.faithful:
                adv = advantages(r, None)          # the reference has no baseline
            else:
                if baseline is None:
                    baseline = update_baseline(None, r, ctl.baseline_decay)
                adv = advantages(r, baseline)
            loss = reinforce_loss(logp, adv, ent, 0.0 if spec.faithful else ctl.entropy_coef)   # reference: none
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics = rl_metrics(r, baseline if not spec.faithful else 0.0, adv, ent)
            if not spec.faithful:
                baseline = update_baseline(baseline, r, ctl.baseline_decay)
            probs = controller.marginals(rules, candidates)
        else:
            probs = {}
        for i, (arch, res) in enumerate(zip(archs, results)):
            row = {"episode": start + i + 1, "arch": arch_key(arch), **flat_arch(arch), "params": res["params"],
                   "val_acc": res["val_acc"], "reward": rewards[i], "child_s": res.get("train_s", float("nan")),
                   "cached": bool(res.get("cached", False)),
                   **{k: res[k] for k in ("engine_path", "kernels_loaded") if k in res}}   # what measured it
            if spec.learns:
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


def make_evaluator(ds, child: Mapping[str, Any], cache_path=None):
    """``evaluate(archs, child_seeds, data_seed)`` training children on ``ds`` train, scoring on val.

    ``child`` holds :func:`helpers.nas.train_children` options (epochs, batch_size, lr, engine,
    precision, device). With ``cache_path`` results are cached by (architecture, seed, settings,
    data) and marked ``cached``; runs that opt in say so on their page.
    """
    cache = ChildCache(cache_path) if cache_path else None
    child = {**dict(child), "device": str(resolve_device(child.get("device", "auto")))}

    def evaluate(archs, child_seeds, data_seed):
        return train_children(archs, ds["train"], ds["val"], num_classes=ds.n_classes, in_chans=ds.n_channels,
                              seeds=child_seeds, data_seed=data_seed, cache=cache, **dict(child))
    from ..experiment import data_fingerprint
    evaluate.data_fingerprint = data_fingerprint(ds)  # what a stored search was scored on
    return evaluate


def search_all(recorder, strategies: Sequence[str], seeds: Sequence[int], cfg: SearchConfig, evaluate,
               log=print) -> pd.DataFrame:
    """Run every (strategy, seed) search, each stored as one unit (:meth:`helpers.results.Recorder.unit`:
    a finished one made with the same config, data and code is not redone).

    Returns all episodes stacked, with ``strategy`` and ``seed`` columns.
    """
    for strategy in strategies:
        for seed in seeds:
            def compute(strategy=strategy, seed=seed) -> dict:
                t0 = time.perf_counter()
                df = run_search(strategy, seed, cfg, evaluate, log)
                best = df.loc[df["reward"].idxmax()]
                return {"metrics": {"mean_reward": df["reward"].mean(), "mean_params": df["params"].mean(),
                                    "mean_val_acc": df["val_acc"].mean(), "best_reward": best["reward"],
                                    "best_arch": best["arch"], "search_s": time.perf_counter() - t0,
                                    "children": len(df), "cached_children": int(df["cached"].sum()),
                                    **({"engine": ", ".join(sorted(map(str, set(df["engine_path"]))))}
                                       if "engine_path" in df else {})},
                        "history": df}

            recorder.unit({"strategy": strategy, "seed": seed}, compute,
                          fingerprint={"config": repr(cfg), "data": getattr(evaluate, "data_fingerprint", None)},
                          code=unit_code_digest(uses=("nas", "rl")))
    episodes = recorder.histories()
    order = {s: i for i, s in enumerate(strategies)}
    return episodes.sort_values(["strategy", "seed", "episode"], key=lambda c: c.map(order) if c.name == "strategy" else c,
                                ignore_index=True)
