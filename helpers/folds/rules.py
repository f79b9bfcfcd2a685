"""Rules that turn per-fold diagnostics into recommendations, each with its evidence and folds.

The rules and their thresholds are data (:data:`RULES`); each names a check (:data:`CHECKS`), the
share of folds that must meet it, the advice and the config changes that apply it. A *fold* rule
is checked fold by fold and fires when at least ``min_share`` of the folds meet it (``min_share=0``:
any one fold); a *run* rule is checked on the whole table (subgroups, spread over folds).

What the evidence can and cannot say is built into the checks. A fold whose best epoch is 1 and
whose val loss rose after it was not stopped by impatience: more patience would only have trained
further past its best, so that fold points at the LR (``lr_too_high``) and is not counted as
evidence for ``min_epochs`` or ``patience``, which need folds that stopped while they might still
have improved.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pandas as pd


@dataclass(frozen=True)
class Rule:
    """One rule: ``check`` names a function of :data:`CHECKS`; ``changes`` are ``(path, op, value)``
    with ``op`` one of ``scale``, ``set``, ``merge`` applied to a config (``fit.lr``, ``augment``,
    ``sampler``); no changes: advice only (e.g. it would change the folds themselves)."""

    name: str
    scope: str                     # fold | run
    check: str
    when: str                      # the trigger in words, with {threshold} fields
    thresholds: Mapping[str, float]
    advice: str
    changes: tuple = ()
    min_share: float = 0.5         # fold rules: share of folds that must meet the check (0: any one)
    not_with: tuple = ()           # fold rules: folds meeting these rules do not count as evidence here

    def describe(self) -> str:
        return self.when.format(**self.thresholds)


# ---- the checks ----------------------------------------------------------------------------------
def _lr_too_high(row: Mapping, t: Mapping) -> bool:
    return row["best_epoch"] == 1 and row["epochs_trained"] >= 2 and _gt(row["val_loss_slope"], t["slope"])


def _stopped_before_floor(row: Mapping, t: Mapping) -> bool:
    return bool(row["stopped_early"]) and row["epochs_trained"] < t["floor"]


def _stopped_while_improving(row: Mapping, t: Mapping) -> bool:
    return bool(row["stopped_early"]) and row["best_epoch"] > 1 and _lt(row["val_loss_slope"], -t["slope"])


def _still_improving_at_end(row: Mapping, t: Mapping) -> bool:
    return (not row["stopped_early"]) and row["epochs_trained"] - row["best_epoch"] <= t["last"] \
        and row["best_epoch"] > 1


def _overfit(row: Mapping, t: Mapping) -> bool:
    return _gt(row["gap_at_best"], t["points"])


#: The names of the label's own subgroup column (``group_errors``' default); any other is a group column.
LABEL_COLUMNS = ("class", "grade")


def _label_groups(groups: pd.DataFrame | None) -> pd.DataFrame | None:
    if groups is None or groups.empty or "column" not in groups:
        return groups
    return groups[groups["column"].isin(LABEL_COLUMNS)]


def _subgroup(table: pd.DataFrame, groups: pd.DataFrame, t: Mapping) -> tuple[bool, str, list[int]]:
    """Pooled over folds: the worst class's (or grade's) mean error over the best one's."""
    groups = _label_groups(groups)
    if groups is None or groups.empty:
        return False, "", []
    g = groups[groups["group"] != "all"].groupby("group")["value"].mean()
    if len(g) < 2:
        return False, "", []
    ratio = float(g.max() / max(g.min(), t["floor"]))
    metric = groups["metric"].iloc[0]
    worst, best = g.idxmax(), g.idxmin()
    folds = sorted(int(f) for f in table.loc[table["group_ratio"] >= t["ratio"], "fold"]) if "group_ratio" in table else []
    evidence = (f"group {worst} {metric.upper() if metric == 'mae' else metric} {g.max():.3f} is {ratio:.1f}x "
                f"group {best}'s {g.min():.3f} (mean over folds)")
    return ratio >= t["ratio"], evidence, folds


def _group_column(table: pd.DataFrame, groups: pd.DataFrame, t: Mapping) -> tuple[bool, str, list[int], dict]:
    """Per group column (not the label's): the worst group's mean error over folds against the best
    one's; fires for the column with the largest ratio at or above ``ratio``. The folds are those
    whose own worst/best ratio in that column reaches it; ``{column}`` fills the rule's changes."""
    if groups is None or groups.empty or "column" not in groups:
        return False, "", [], {}
    g = groups[~groups["column"].isin(LABEL_COLUMNS) & (groups["group"] != "all")]
    best = None
    for column, sub in g.groupby("column", sort=True):
        means = sub.groupby("group")["value"].mean()
        if len(means) < 2:
            continue
        ratio = float(means.max() / max(means.min(), t["floor"]))
        if best is None or ratio > best[1]:
            best = (column, ratio, means, sub)
    if best is None or best[1] < t["ratio"]:
        return False, "", [], {}
    column, ratio, means, sub = best
    per_fold = sub.groupby("fold")["value"].agg(lambda v: float(v.max() / max(v.min(), t["floor"])) if len(v) > 1 else 0.0)
    folds = sorted(int(f) for f, r in per_fold.items() if r >= t["ratio"])
    metric = sub["metric"].iloc[0]
    evidence = (f"column {column}: group {means.idxmax()} {metric.upper() if metric == 'mae' else metric} "
                f"{means.max():.3f} is {ratio:.1f}x group {means.idxmin()}'s {means.min():.3f} (mean over folds)")
    return True, evidence, folds, {"column": column}


def _spread(table: pd.DataFrame, groups: pd.DataFrame, t: Mapping, metric: str) -> tuple[bool, str, list[int]]:
    values = table[metric].astype(float)
    sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    limit = t[metric] if metric in t else t["default"]
    evidence = f"{metric.upper()} ranges {values.min():.3f} to {values.max():.3f} over folds (sd {sd:.3f})"
    return _gt(sd, limit), evidence, list(table["fold"].astype(int))


def _gt(v, limit) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v > limit


def _lt(v, limit) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v < limit


#: Named checks: fold checks take (row, thresholds); run checks (table, groups, thresholds[, metric]).
CHECKS: dict[str, Callable] = {"lr_too_high": _lr_too_high, "stopped_before_floor": _stopped_before_floor,
                               "stopped_while_improving": _stopped_while_improving,
                               "still_improving_at_end": _still_improving_at_end, "overfit": _overfit,
                               "subgroup": _subgroup, "group_column": _group_column, "spread": _spread}

RULES: tuple[Rule, ...] = (
    Rule("lr_too_high", "fold", "lr_too_high",
         "best epoch 1 while the val loss rose after it (slope above {slope:+g} of its best value per epoch)",
         {"slope": 0.0},
         "lower the LR (patience is not the cause: the best epoch was the first, so more patience only trains "
         "further past it)", (("fit.lr", "scale", 0.3),)),
    Rule("min_epochs", "fold", "stopped_before_floor",
         "stopped early before epoch {floor:.0f}", {"floor": 5},
         "set min_epochs, so early stopping cannot end a fold before it has had a chance to learn",
         (("fit.min_epochs", "set", 5),), not_with=("lr_too_high",)),
    Rule("patience", "fold", "stopped_while_improving",
         "stopped early while the val loss was still falling after its best epoch (slope below {slope:+g})",
         {"slope": 0.0}, "raise the patience (or min_delta was larger than the improvements)",
         (("fit.patience", "scale", 2),), not_with=("lr_too_high",)),
    Rule("underfit", "fold", "still_improving_at_end",
         "not stopped early and best epoch within {last:.0f} epoch(s) of the last: still improving at the end",
         {"last": 1},
         "the epoch budget ran out while the fold still improved: raise the LR (at this budget) or the epochs",
         (("fit.lr", "scale", 2.0),)),
    Rule("overfit", "fold", "overfit",
         "train/val gap above {points:.0f} points (ACC or R²) at the best epoch", {"points": 10},
         "more weight decay or augmentation",
         (("fit.weight_decay", "scale", 10), ("augment", "merge", {"rotate": 15, "translate": 0.1,
                                                                    "scale": [0.9, 1.1]})), min_share=0.0),
    Rule("subgroup", "run", "subgroup",
         "the worst subgroup's error is at least {ratio:.1f}x the best subgroup's (best floored at {floor:.2f})",
         {"ratio": 4.0, "floor": 0.02}, "reweight or resample the subgroups (class-balanced batches)",
         (("sampler", "set", "weighted"),)),
    Rule("group_column", "run", "group_column",
         "in a group column beyond the class or grade (e.g. brightness, site), the worst group's error is at least "
         "{ratio:.1f}x the best group's (best floored at {floor:.2f})", {"ratio": 4.0, "floor": 0.02},
         "reweight or resample that column's groups (batches balanced over its groups)",
         (("sampler", "set", "group:{column}"),)),
    Rule("spread", "run", "spread",
         "the headline metric's sd over folds is above {default:.2f} (R²: {r2:.2f})", {"default": 0.05, "r2": 0.10},
         "more data per fold or fewer folds (not applied here: it would change the folds, so before and "
         "after could no longer be paired)"),
)
#: Rules that pull the same setting in opposite directions: only the one with more folds is applied.
#: (Both subgroup rules set the sampler: one sampler only, the label's on a tie.)
OPPOSED = (("lr_too_high", "underfit"), ("subgroup", "group_column"))


def rules_table(rules: Sequence[Rule] = RULES) -> pd.DataFrame:
    """The rules as the book lists them: name, scope, trigger (with thresholds), share of folds, advice, change."""
    return pd.DataFrame([{"rule": r.name, "scope": r.scope, "trigger": r.describe(),
                          "folds needed": ("any one" if r.min_share == 0 else f"at least {r.min_share:.0%}")
                          if r.scope == "fold" else "whole run",
                          "advice": r.advice, "applied as": describe_changes(r.changes) or "advice only"}
                         for r in rules])


def describe_changes(changes: Sequence) -> str:
    parts = []
    for path, op, value in changes:
        if isinstance(value, str):
            value = value.replace("{column}", "<column>")
        parts.append(f"{path} x {value:g}" if op == "scale" else f"{path} = {value}" if op == "set"
                     else f"{path} += {value}")
    return "; ".join(parts)


def _slope(value: float) -> str:
    """A relative val-loss slope per epoch, legible when small (``-4.1e-04``, not ``-0.000``)."""
    return f"{value:+.1e}" if 0 < abs(value) < 1e-3 else f"{value:+.3f}"


def _fold_evidence(row: Mapping, rule: Rule) -> str:
    if rule.check == "lr_too_high":
        return f"fold {row['fold']}: best epoch 1 of {row['epochs_trained']}, val loss slope {_slope(row['val_loss_slope'])}/epoch"
    if rule.check == "stopped_before_floor":
        return f"fold {row['fold']}: stopped at epoch {row['epochs_trained']} (best {row['best_epoch']})"
    if rule.check == "stopped_while_improving":
        return f"fold {row['fold']}: stopped at {row['epochs_trained']}, val loss slope {_slope(row['val_loss_slope'])}/epoch"
    if rule.check == "still_improving_at_end":
        return f"fold {row['fold']}: best epoch {row['best_epoch']} of {row['epochs_trained']} (budget)"
    if rule.check == "overfit":
        return f"fold {row['fold']}: gap {row['gap_at_best']:.1f} points at epoch {row['best_epoch']}"
    return f"fold {row['fold']}"


def evaluate_rules(table: pd.DataFrame, groups: pd.DataFrame | None = None, *, headline: str = "auc",
                   rules: Sequence[Rule] = RULES) -> pd.DataFrame:
    """The recommendations for one (target, config) diagnostics table (:func:`fold_table`).

    One row per fired rule: ``rule``, ``folds`` (the fold numbers that triggered it), ``n_folds``,
    ``of`` (folds in the run), ``evidence`` (numbers and folds), ``advice``, ``changes`` and
    ``applied`` (False for advice-only rules and for the weaker of two opposed rules). A healthy run
    gives an empty frame.
    """
    rows, met = [], {}
    k = len(table)
    records = table.to_dict("records")
    for rule in rules:
        if rule.scope == "fold":
            met[rule.name] = [int(r["fold"]) for r in records if CHECKS[rule.check](r, rule.thresholds)]
    for rule in rules:
        if rule.scope == "fold":
            excluded = {f for other in rule.not_with for f in met.get(other, [])}
            folds = [f for f in met[rule.name] if f not in excluded]
            need = max(1, math.ceil(rule.min_share * k - 1e-9))
            if len(folds) < need:
                continue
            ev_rows = [r for r in records if int(r["fold"]) in folds]
            evidence = (f"{rule.describe()} in {len(folds)} of {k} folds ({', '.join(map(str, folds))}): "
                        + "; ".join(_fold_evidence(r, rule) for r in ev_rows))
            if excluded & set(met[rule.name]):
                evidence += (f"; folds {', '.join(map(str, sorted(excluded & set(met[rule.name]))))} also met it but "
                             f"their evidence points at {', '.join(rule.not_with)}")
        changes = list(rule.changes)
        if rule.scope == "run":
            extra = (headline,) if rule.check == "spread" else ()
            fired, evidence, folds, *fields = CHECKS[rule.check](table, groups, rule.thresholds, *extra)
            if not fired:
                continue
            evidence = f"{rule.describe()}: {evidence}"
            if fields:   # a run check may name what its changes act on (e.g. the group column)
                changes = [(path, op, value.format(**fields[0]) if isinstance(value, str) else value)
                           for path, op, value in changes]
        rows.append({"rule": rule.name, "folds": folds, "n_folds": len(folds), "of": k, "evidence": evidence,
                     "advice": rule.advice, "changes": changes, "applied": bool(changes)})
    out = pd.DataFrame(rows, columns=["rule", "folds", "n_folds", "of", "evidence", "advice", "changes", "applied"])
    for a, b in OPPOSED:
        both = out[out["rule"].isin([a, b])]
        if len(both) == 2:
            weaker = both.sort_values("n_folds", kind="stable").iloc[0]["rule"] if both["n_folds"].nunique() > 1 else b
            out.loc[out["rule"] == weaker, "applied"] = False
            out.loc[out["rule"] == weaker, "evidence"] += f" (not applied: opposed by {a if weaker == b else b}, met in more folds)"
    return out


def apply_recommendations(config: Mapping[str, Any], recs: pd.DataFrame) -> dict:
    """A new config (``{"fit": ..., "augment": ..., "sampler": ...}``) with the applied recommendations'
    changes made to ``config``; ``fit`` values missing from it scale the :class:`FitConfig` default."""
    from ..train import FitConfig

    defaults = FitConfig()
    new = copy.deepcopy({"fit": dict(config.get("fit") or {}), "augment": dict(config.get("augment") or {}),
                         "sampler": config.get("sampler")})
    for _, rec in recs[recs["applied"]].iterrows() if len(recs) else []:
        for path, op, value in rec["changes"]:
            group, _, key = path.partition(".")
            if group == "fit":
                current = new["fit"].get(key, getattr(defaults, key))
                if op == "scale":
                    if current is None:
                        continue
                    scaled = current * value
                    new["fit"][key] = int(round(scaled)) if isinstance(current, int) else float(scaled)
                else:
                    new["fit"][key] = max(current, value) if key == "min_epochs" else value
            elif group == "augment" and op == "merge":
                for k, v in value.items():
                    old = new["augment"].get(k)
                    new["augment"][k] = v if old is None or not isinstance(v, (int, float)) else max(old, v)
            elif group == "sampler" and op == "set":
                new["sampler"] = value
            else:
                raise ValueError(f"rule {rec['rule']}: cannot apply {path} {op} {value}")
    return new


def config_differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> pd.DataFrame:
    """The settings that differ between two configs, one row each (setting, before, after)."""
    from ..train import FitConfig

    defaults = FitConfig()
    rows = []
    for key in sorted(set(before.get("fit", {})) | set(after.get("fit", {}))):
        b = before.get("fit", {}).get(key, getattr(defaults, key))
        a = after.get("fit", {}).get(key, getattr(defaults, key))
        if a != b:
            rows.append({"setting": f"fit.{key}", "before": str(b), "after": str(a)})
    if dict(before.get("augment") or {}) != dict(after.get("augment") or {}):
        rows.append({"setting": "augment", "before": str(dict(before.get("augment") or {})),
                     "after": str(dict(after.get("augment") or {}))})
    if before.get("sampler") != after.get("sampler"):
        rows.append({"setting": "sampler", "before": str(before.get("sampler")), "after": str(after.get("sampler"))})
    return pd.DataFrame(rows, columns=["setting", "before", "after"])


def recommendation_sentences(recs: pd.DataFrame, what: str) -> str:
    """The recommendations of one run as Markdown bullets: advice, evidence and folds; or that none fired."""
    if recs.empty:
        return f"**{what}**: no rule fired; the diagnostics give no reason to change the config."
    lines = [f"**{what}**: {len(recs)} recommendation(s)."]
    for _, r in recs.iterrows():
        status = "applied" if r["applied"] else "not applied"
        lines.append(f"- **{r['rule']}** ({status}): {r['advice']}. Evidence: {r['evidence']}.")
    return "\n".join(lines)
