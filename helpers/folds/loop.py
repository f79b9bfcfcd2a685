"""The loop closed for one target: run the folds with the "before" config, diagnose them, turn the
diagnostics into recommendations, apply them as the "after" config, run the same folds again, set
the two side by side, and evaluate only the chosen config once on the official test split."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pandas as pd

from .. import data as data_mod
from ..results import Recorder
from .compare import choose_config, paired_folds
from .cv import Arm, final_unit, run_folds, unit_variant
from .diagnostics import fold_table, pooled_metrics, subgroup_table
from .groups import group_frame, sampler_column
from .rules import apply_recommendations, config_differences, evaluate_rules
from .targets import Target


@dataclass
class TargetResult:
    """Everything the page shows for one target (all tables are read back from stored units)."""

    target: Target
    configs: dict                                  # name -> config dict (fit, augment, sampler)
    diagnostics: pd.DataFrame                      # one row per (config, fold)
    groups: pd.DataFrame                           # per (config, fold, column, subgroup) errors
    recommendations: pd.DataFrame                  # fired rules on the "before" run
    changes: pd.DataFrame                          # before vs after settings
    pooled: pd.DataFrame                           # out-of-fold metrics per config
    tests: pd.DataFrame                            # every config vs before, paired over folds (column a)
    chosen: str
    final: dict = field(default_factory=dict)      # the chosen config's val and test metrics
    n_classes: int = 0                             # classes or grades of the flag
    variants: dict = field(default_factory=dict)   # config -> the variant key of its units
    columns: tuple = ()                            # the subgroup columns: the label's (class or grade), then the target's


def close_loop(recorder: Recorder, ds: data_mod.MedMNIST, target: Target, before: Mapping[str, Any], *,
               k: int, base_fit: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]] | None = None,
               fold_seed: int = 0, model: str = "cnn", model_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
               batch_size: int = 64, device: str = "auto", ablate: bool | None = None,
               log: Callable[[str], None] | None = None) -> TargetResult:
    """Before -> diagnostics -> recommendations -> after (same folds) -> comparison -> one test run.

    ``before`` is a config (``fit``, ``augment``, ``sampler``) on top of ``base_fit`` (the profile's
    epoch budget and monitor); ``extra`` configs (e.g. the write-up's own recommended one) run on the
    same folds and are compared too. When no rule fires, "after" equals "before" and is not rerun.
    ``ablate`` (default ``target.ablate``): when more than one recommendation is applied, also run each
    alone (``only <rule>``), so the page can say which of them helped or hurt. Every config is compared
    with "before".

    The target's group columns (``target.groups``) are cut once on ``ds``'s train split
    (:func:`helpers.folds.groups.group_frame`); every fold and config reads its subgroups from them.
    """
    frame = group_frame(ds["train"], target.groups) if target.groups else None
    for name, spec in {"before": before, **dict(extra or {})}.items():   # a group sampler needs its column: refuse now
        column = sampler_column(spec.get("sampler"))
        if column is not None and (frame is None or column not in frame):
            from ..config import ParamsError

            raise ParamsError(f"config '{name}': sampler group:{column} names no group column of target {target.name} "
                              f"(it has {', '.join(c.name for c in target.groups) or 'none'}). Fix: add it to the "
                              f"target's groups, or use sampler weighted or null.")
    common = dict(model=model, model_kwargs=model_kwargs, seed=seed, batch_size=batch_size, device=device)
    before = {"fit": {**dict(base_fit), **dict(before.get("fit") or {})}, "augment": dict(before.get("augment") or {}),
              "sampler": before.get("sampler")}
    configs = {"before": before}
    arm = Arm.from_dict("before", before)
    run_folds(recorder, ds, target, arm, k=k, fold_seed=fold_seed, log=log, frame=frame, **common)
    variants = {"before": unit_variant(arm, model, model_kwargs)}
    table = fold_table(recorder, target, "before", arm.fit_config(), ds.n_classes, variants["before"], frame)
    groups = subgroup_table(recorder, target, "before", ds.n_classes, variants["before"], frame)
    recs = evaluate_rules(table, groups, headline=target.headline()[0])
    after = apply_recommendations(before, recs)
    changes = config_differences(before, after)
    if not changes.empty:
        configs["after"] = after
    applied = list(recs.loc[recs["applied"], "rule"]) if len(recs) else []
    if (target.ablate if ablate is None else ablate) and len(applied) > 1:   # one recommendation at a time: which of them helped or hurt
        for rule in applied:
            configs[f"only {rule}"] = apply_recommendations(before, recs[recs["rule"] == rule])
    for name, spec in (extra or {}).items():
        if name in ("before", "after") or name.startswith("only "):
            from ..config import ParamsError

            raise ParamsError(f"extra_configs: the name '{name}' is taken by a generated config; choose another")
        configs[name] = {"fit": {**dict(base_fit), **dict(spec.get("fit") or {})},
                         "augment": dict(spec.get("augment") or {}), "sampler": spec.get("sampler")}
    tables, group_tables = [table], [groups]
    for name, spec in configs.items():
        if name == "before":
            continue
        arm = Arm.from_dict(name, spec)
        variants[name] = unit_variant(arm, model, model_kwargs)
        run_folds(recorder, ds, target, arm, k=k, fold_seed=fold_seed, log=log, frame=frame, **common)
        tables.append(fold_table(recorder, target, name, arm.fit_config(), ds.n_classes, variants[name], frame))
        group_tables.append(subgroup_table(recorder, target, name, ds.n_classes, variants[name], frame))
    diagnostics = pd.concat(tables, ignore_index=True)
    pooled = pd.DataFrame([{"target": target.name, "config": name,
                            **pooled_metrics(recorder, target, name, ds.n_classes, ds.task, variants[name])}
                           for name in configs])
    tests = pd.concat([paired_folds(diagnostics, target, a=name) for name in configs if name != "before"]
                      or [pd.DataFrame()], ignore_index=True)
    chosen = choose_config(diagnostics, target, list(configs))
    final = final_unit(recorder, ds, target, Arm.from_dict(chosen, configs[chosen]), frame=frame, **common)
    return TargetResult(target, configs, diagnostics, pd.concat(group_tables, ignore_index=True), recs, changes,
                        pooled, tests, chosen, final, ds.n_classes, variants,
                        (target.label_column, *(c.name for c in target.groups)))
