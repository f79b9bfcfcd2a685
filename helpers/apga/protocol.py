"""The chapter's fair protocol, k-shot subsets and result tables.

**Protocol** (every method alike). For each k and seed: draw the k-shot training subset; train a
clean baseline (``pretrain``, its own epochs, selected on val, test never touched); then every
method starts from the baseline's weights and trains for the *same* number of epochs, with two
classifier updates per batch (the loop's clean step plus the method's step, see
:mod:`helpers.apga.hooks`), is validated once per epoch (the same number of validation looks, no
early stopping), keeps its best epoch by the same monitor on val, and is tested once. Every
evaluation (the baseline's too) re-estimates the classifier's BatchNorm statistics on the clean
training images first (:mod:`helpers.apga.batchnorm`). The reference instead validated APGA every
100 iterations with test-time augmentation but its baselines once per epoch, and reported the
best val accuracy.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import data as data_mod
from ..config import ParamsError
from ..experiment import train_and_test, unit_settings
from ..models import create_model
from ..repro import packages_used, unit_code_digest
from ..results import Recorder, digest
from ..stats import compare_pairs, holm
from ..train import FitConfig
from .batchnorm import PreciseBNScorer
from .hooks import APGAHook, CutoutHook, EndToEndHook, GradCAMHook, RepeatHook
from .masks import fill_value, overlap

#: The methods of the chapter, in table order; ``clean`` and ``cutout`` are the controls.
METHODS = ("clean", "cutout", "gradcam", "end2end", "apga", "apga_faithful")
CONTROLS = ("clean", "cutout")

#: The agent settings of the reference (``apga_mura.py``) that ``apga_faithful`` keeps by default,
#: where :class:`helpers.apga.hooks.APGAHook`'s defaults differ: one agent update per batch, raw
#: advantages, a start at p = 0.5, one action per pixel, and the loss gain alone as the reward. (The
#: agent's learning rate comes from the params group; the reference's was 1e-5.)
REFERENCE_APGA = {"agent_steps": 1, "normalize_advantage": False, "init_erase_p": 0.5, "mask_cell": 1,
                  "area_cost": 0.0}


def k_label(k: int | None) -> str:
    """A k-shot size as a unit key: ``"10"``, ..., ``"all"``."""
    return "all" if k is None else str(int(k))


def kshot(ds: data_mod.MedMNIST, k: int | None, seed: int) -> data_mod.MedMNIST:
    """``ds`` with its training split cut to ``k`` images of every class (k positive and k negative
    for a binary task), drawn from train only with a generator seeded by ``seed``; val and test are
    unchanged. ``k=None`` keeps the whole training split."""
    if k is None:
        return ds
    if ds.multilabel:
        raise ValueError(f"kshot: {ds.flag} is multi-label; k-shot subsets are defined per class of a "
                         f"single-label task")
    k = int(k)
    if k < 1:
        raise ValueError(f"kshot: k={k}; give k >= 1 images per class, or null for the whole training split")
    labels = ds["train"].labels.numpy()
    rng = np.random.default_rng([int(seed), k])
    picks = []
    for c in range(ds.n_classes):
        where = np.flatnonzero(labels == c)
        if len(where) < k:
            raise ValueError(f"kshot: {ds.flag} train has {len(where)} images of class {c} "
                             f"({ds.label_names.get(str(c), c)}), fewer than k={k}. Fix: lower k (or use null "
                             f"for the whole split).")
        picks.append(rng.choice(where, k, replace=False))
    idx = np.sort(np.concatenate(picks))
    return replace(ds, splits={**ds.splits, "train": ds["train"].take(idx)})


def check_protocol(cfg: FitConfig) -> None:
    """Refuse a fit config that would give methods different numbers of validation looks."""
    if cfg.patience is not None:
        raise ParamsError(f"fit.patience={cfg.patience}: the fair protocol gives every method the same number of "
                          f"validation looks (one per epoch, {cfg.epochs} epochs). Fix: set fit.patience to null.")


def check_equal_looks(histories: pd.DataFrame, by: Sequence[str] = ("flag", "k", "seed"),
                      method: str = "method", monitor: str = "val/auc") -> pd.DataFrame:
    """The number of validation looks (epochs with a ``monitor`` score) per method within each ``by``
    group; raises ``AssertionError`` naming the group when the methods of a group differ."""
    scored = histories.dropna(subset=[monitor]) if monitor in histories else histories
    looks = scored.groupby([*by, method]).size().rename("val_looks").reset_index()
    for key, group in looks.groupby(list(by)):
        if group["val_looks"].nunique() > 1:
            raise AssertionError(f"unequal validation looks in {dict(zip(by, key))}: "
                                 f"{dict(zip(group[method], group['val_looks']))}")
    return looks


def probe_batch(ds: data_mod.MedMNIST, n: int, mean: float = 0.5, std: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` validation images (normalised) and labels: fixed images for the gallery."""
    split = ds["val"]
    x = split.images[:n].float().div(255.0).sub(mean).div(std)
    return x, split.labels[:n]


def faithful_group(apga: Mapping[str, Any], apga_faithful: Mapping[str, Any] | None = None) -> dict:
    """The settings of ``apga_faithful``: its own group over :data:`REFERENCE_APGA`, or, without
    one, the ``apga`` group's learning rate and coefficients with the reference's other settings."""
    if apga_faithful is None:
        return {**dict(apga), **REFERENCE_APGA}
    return {**REFERENCE_APGA, **dict(apga_faithful)}


def agent_settings(apga: Mapping[str, Any], apga_faithful: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The settings each APGA variant runs with (the hook's defaults, then its params group, as
    :func:`make_hook` builds it): one row per setting, one column per variant."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(APGAHook.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty and k != "probe"}
    variants = {"apga": {**defaults, **dict(apga)},
                "apga_faithful": {**defaults, **faithful_group(apga, apga_faithful), "faithful": True}}
    keys = list(dict.fromkeys(k for v in variants.values() for k in v))
    return pd.DataFrame({"setting": keys, **{name: [str(v.get(k)) for k in keys] for name, v in variants.items()}})


def make_hook(method: str, ds: data_mod.MedMNIST, seed: int, *, baseline: torch.nn.Module, agent: Mapping[str, Any],
              apga: Mapping[str, Any], end2end: Mapping[str, Any], cutout: Mapping[str, Any],
              gradcam: Mapping[str, Any], apga_faithful: Mapping[str, Any] | None = None, probe=None):
    """The hook of ``method`` (one of :data:`METHODS`), with its params groups (``apga_faithful``:
    :func:`faithful_group`)."""
    fill = fill_value()
    task = ds.task

    def new_agent() -> torch.nn.Module:
        torch.manual_seed(seed + 10_000)   # the agent's init is seeded apart from the classifier's
        return create_model(agent["model"], num_classes=1, in_chans=ds.n_channels, **dict(agent.get("kwargs") or {}))

    if method == "clean":
        return RepeatHook(task, probe)
    if method == "cutout":
        return CutoutHook(task, fill, seed=seed, probe=probe, **dict(cutout))
    if method == "gradcam":
        return GradCAMHook(task, baseline, fill, probe=probe, **dict(gradcam))
    if method == "end2end":
        return EndToEndHook(task, new_agent(), fill, probe=probe, **dict(end2end))
    if method == "apga":
        return APGAHook(task, new_agent(), fill, probe=probe, **dict(apga))
    if method == "apga_faithful":
        return APGAHook(task, new_agent(), fill, faithful=True, probe=probe, **faithful_group(apga, apga_faithful))
    raise ParamsError(f"method '{method}' unknown; use one of {', '.join(METHODS)}")


def agent_for(size: int, small: Mapping[str, Any], large: Mapping[str, Any]) -> Mapping[str, Any]:
    """The agent for images of side ``size``: ``large`` (segmentation-models-pytorch, whose encoders
    need sides divisible by 32) where the side allows, else ``small`` (our U-Net, any side)."""
    return large if size % 32 == 0 else small


def method_code(scorer=None) -> str:
    """The code digest a method unit of :func:`run_protocol` is made with (its hooks all come from
    :mod:`helpers.apga.hooks`), as stored in the clear in the unit's record (``code_digest``)."""
    return unit_code_digest(uses=packages_used(APGAHook, scorer))


def run_protocol(recorder: Recorder, ds: data_mod.MedMNIST, *, methods: Sequence[str], seeds: Sequence[int],
                 ks: Sequence[int | None], model: str, pretrain: FitConfig, cfg: FitConfig, batch_size: int,
                 agent: Mapping[str, Any], apga: Mapping[str, Any], end2end: Mapping[str, Any],
                 cutout: Mapping[str, Any], gradcam: Mapping[str, Any], probe_n: int = 8,
                 device: str = "auto", model_kwargs: Mapping[str, Any] | None = None,
                 apga_faithful: Mapping[str, Any] | None = None, precise_bn: bool = True) -> pd.DataFrame:
    """Run the protocol (module docstring) for one dataset; units are stored in ``recorder`` (and
    reused when already there). Unit keys: ``flag``, ``size``, ``k``, ``seed``, ``method``.

    ``apga_faithful``: :func:`make_hook` and :func:`faithful_group`. ``precise_bn``: every unit (the
    baselines too) is evaluated, on val at every epoch and on test once, with its BatchNorm
    statistics re-estimated on its clean training images (:mod:`helpers.apga.batchnorm`).

    Returns the budget per k and seed: training images, batches per epoch, epochs and classifier
    updates of the baseline and of every method (two per batch), and the agent updates of each
    APGA variant in ``methods``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ParamsError(f"methods {unknown} unknown; use some of {', '.join(METHODS)}")
    check_protocol(cfg)
    probe = probe_batch(ds, probe_n)
    plan = []
    for k in ks:
        for seed in seeds:
            sub = kshot(ds, k, seed)
            keys = {"flag": ds.flag, "size": ds.size, "k": k_label(k), "seed": seed}
            batches = -(-len(sub["train"]) // batch_size)
            steps = {"apga": dict(apga).get("agent_steps", APGAHook.DEFAULT_AGENT_STEPS),
                     "apga_faithful": faithful_group(apga, apga_faithful)["agent_steps"]}
            plan.append({**keys, "train images": len(sub["train"]), "batches per epoch": batches,
                         "baseline epochs": pretrain.epochs, "method epochs": cfg.epochs,
                         "classifier updates per method": 2 * batches * cfg.epochs,
                         "val looks per method": cfg.epochs,
                         **{f"agent updates ({m})": int(steps[m]) * batches * cfg.epochs
                            for m in steps if m in methods}})
            pre_keys = {**keys, "method": "pretrain"}
            scorer = PreciseBNScorer(sub["train"], sub.task, batch_size) if precise_bn else None
            settings = unit_settings(model, model_kwargs=model_kwargs)
            stored = {**pre_keys, **({"variant": digest(settings)[:8]} if settings else {})}
            baseline = dict(batch_size=batch_size, unit=pre_keys, keep_model=True, evaluate_on=("val",),
                            model_kwargs=model_kwargs, device=device, scorer=scorer)
            stashed = recorder.has_unit(**stored) and not recorder.model_path(**stored).is_file()
            if stashed:   # restored from a stash (helpers.book.stash), which leaves weights behind
                done = [u for u in recorder.units() if u["keys"].get("method") in methods
                        and all(u["keys"].get(c) == v for c, v in keys.items())]
                if ({u["keys"]["method"] for u in done} >= set(methods)
                        and train_and_test(recorder, sub, model, seed, pretrain, dry_run=True, **baseline)
                        and all(u.get("code_digest") == method_code(scorer) for u in done)):
                    continue   # every method unit of this k and seed is stored, by this code: nothing reads the weights
                recorder.forget(**stored)   # the methods start from its weights: retrain it
                done = [u["keys"] for u in done]
            train_and_test(recorder, sub, model, seed, pretrain, **baseline)
            weights = recorder.load_model(**stored)
            if stashed:   # a method unit's name holds its initial weights' digest: drop those of the old ones
                variant = digest(unit_settings(model, model_kwargs=model_kwargs, init_from=weights))[:8]
                for u in done:
                    if u.get("variant") != variant:
                        recorder.forget(**u)
            base = create_model(model, num_classes=sub.n_classes, in_chans=sub.n_channels, **dict(model_kwargs or {}))
            base.load_state_dict(weights)
            for method in methods:
                hook = make_hook(method, sub, seed, baseline=base, agent=agent, apga=apga, end2end=end2end,
                                 cutout=cutout, gradcam=gradcam, apga_faithful=apga_faithful, probe=probe)
                train_and_test(recorder, sub, model, seed, cfg, batch_size=batch_size, hooks=[hook],
                               unit={**keys, "method": method}, init_from=weights, model_kwargs=model_kwargs,
                               device=device, keep_model=True,   # rebuilt by the summary page (robustness)
                               scorer=scorer)   # its stored weights hold the re-estimated statistics
    return pd.DataFrame(plan)


def method_units(wide: pd.DataFrame) -> pd.DataFrame:
    """The method units (not the pretrain baselines) of a wide metrics table, in method order."""
    out = wide[wide["method"].isin(METHODS)].copy()
    out["method"] = pd.Categorical(out["method"], METHODS, ordered=True)
    return out.sort_values(["flag", "size", "k", "method", "seed"], key=_k_sort)


def _k_sort(col: pd.Series) -> pd.Series:
    if col.name == "k":
        return col.map(lambda v: np.inf if v == "all" else float(v))
    return col


def comparisons(units: pd.DataFrame, metric: str, methods: Sequence[str] = ("apga",),
                controls: Sequence[str] = CONTROLS) -> pd.DataFrame:
    """Paired tests (over seeds) of each of ``methods`` against each control, per dataset, size and k,
    with Holm's adjustment over all rows of the table."""
    frames = []
    units = units.assign(method=units["method"].astype(str))
    for (flag, size, k), group in units.groupby(["flag", "size", "k"], sort=False):
        pairs = [(m, c) for m in methods for c in controls if m != c]
        frames.append(compare_pairs(group, pairs, metric, by="method", unit="seed", flag=flag, size=size, k=k))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(out):
        out["p_holm"] = holm(out["p"])
    return out


def outcome(row: Mapping, alpha: float = 0.05) -> str:
    """``won``, ``lost`` or ``tied`` for one comparison row (significant after Holm, else tied)."""
    p = row.get("p_holm", row.get("p"))
    if p is None or not np.isfinite(p) or p >= alpha:
        return "tied"
    return "won" if row["mean_diff"] > 0 else "lost"


def outcome_sentence(table: pd.DataFrame, label: str, alpha: float = 0.05) -> str:
    """Where the method won, lost or tied against each control, in one sentence per method."""
    if not len(table):
        return f"No {label} comparison could be made (a method or a control did not run)."
    table = table.assign(outcome=[outcome(r, alpha) for _, r in table.iterrows()])
    parts = []
    for (a, b), g in table.groupby(["a", "b"], sort=False):
        counts = g["outcome"].value_counts()
        where = {o: ", ".join(f"{r.flag} {r.size}px k={r.k}" for r in g.itertuples() if r.outcome == o)
                 for o in ("won", "lost")}
        text = (f"On {label}, {a} against {b} won {counts.get('won', 0)}, lost {counts.get('lost', 0)} and tied "
                f"{counts.get('tied', 0)} of {len(g)} settings (paired t-tests over seeds, Holm-adjusted, alpha {alpha})")
        extra = [f"won on {where['won']}" if where["won"] else "", f"lost on {where['lost']}" if where["lost"] else ""]
        extra = "; ".join(e for e in extra if e)
        larger = int((g["mean_diff"] > 0).sum())
        parts.append(f"{text}{': ' + extra if extra else ''}; its mean was higher in {larger} of {len(g)}.")
    return " ".join(parts)


def budget_table(units: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    """The budget each method got, read back from the stored units: epochs run, validation looks
    (checked equal across methods, :func:`check_equal_looks`) and mean training time; and the epoch
    that validation selected (mean over seeds, and on how many seeds it was the first: a method whose
    later epochs never win on validation ends as its first epoch's model)."""
    looks = check_equal_looks(histories[histories["method"].isin(METHODS)])
    rows = []
    for (flag, size, k, method), g in units.groupby(["flag", "size", "k", "method"], sort=False, observed=True):
        lk = looks[(looks.flag == flag) & (looks.k == k) & (looks.method == method)]["val_looks"]
        best = g["best_epoch"].dropna().astype(int) if "best_epoch" in g else pd.Series(dtype=int)
        rows.append({"flag": flag, "size": size, "k": k, "method": str(method),
                     "epochs": int(g["epochs_run"].iloc[0]), "val looks": int(lk.iloc[0]) if len(lk) else 0,
                     "selected epoch": f"{best.mean():.1f}" if len(best) else "–",   # mean over seeds
                     "selected at 1": f"{int((best == 1).sum())}/{len(best)}",
                     "mean_train_s": float(g["train_s"].mean())})
    return pd.DataFrame(rows)


def find_unit(recorder: Recorder, **keys: Any) -> dict | None:
    """The full keys of the stored unit whose keys include ``keys`` (its ``variant`` too), or None."""
    for u in recorder.units():
        if all(u["keys"].get(c) == v for c, v in keys.items()):
            return u["keys"]
    return None


def top_share(maps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per image of ``maps`` (B, 1, H, W), the ``counts[b]`` pixels of highest value (ties broken by
    position) as a boolean mask: a region of a given area from a map that never crosses 0.5."""
    flat = maps.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))
    return (ranks < counts.view(-1, 1)).view(maps.shape)


def gallery_overlap(recorder: Recorder, units: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Per APGA unit, on the probe images, against the Grad-CAM region (map > ``threshold``) of the
    same k and seed's frozen baseline: the IoU of the agent's region (erase p > 0.5: what the greedy
    faithful agent erases), and the IoU of its equal-area region (its most-erased pixels, as many as
    the Grad-CAM region has; a sampling agent with a price on area rarely crosses 0.5), each beside
    the IoU of the same agent map paired with another image's Grad-CAM region (chance level)."""
    rows = []
    for r in units[units["method"].astype(str).isin(["apga", "apga_faithful"])].itertuples():
        keys = {c: getattr(r, c) for c in ("flag", "size", "k", "seed")}
        a_keys, g_keys = find_unit(recorder, **keys, method=str(r.method)), find_unit(recorder, **keys, method="gradcam")
        if a_keys is None or g_keys is None:
            continue
        a, cam = recorder.scores(**a_keys).get("probe_erase_p"), recorder.scores(**g_keys).get("probe_gradcam")
        if a is None or cam is None:
            continue
        p = torch.from_numpy(a)
        agent = p > 0.5
        region = torch.from_numpy(cam) > threshold
        shuffled = torch.roll(region, 1, dims=0)
        counts = region.flatten(1).sum(1)
        rows.append({**keys, "method": str(r.method), "agent area": float(agent.float().mean()),
                     "mean p(erase)": float(p.mean()), "Grad-CAM area": float(region.float().mean()),
                     "IoU": float(overlap(agent, region).mean()),
                     "IoU, shuffled pairs": float(overlap(agent, shuffled).mean()),
                     "IoU, equal area": float(overlap(top_share(p, counts), region).mean()),
                     "IoU, equal area, shuffled": float(overlap(top_share(p, torch.roll(counts, 1)), shuffled).mean())})
    return pd.DataFrame(rows)


def overlap_sentence(iou: pd.DataFrame) -> str:
    """How much the agent's region overlaps Grad-CAM's, against the shuffled-pairs chance level."""
    if not len(iou):
        return "No overlap could be measured (an APGA or a Grad-CAM unit is missing)."
    parts = []
    for method, g in iou.groupby("method", sort=False):
        above = int((g["IoU"] > g["IoU, shuffled pairs"]).sum())
        above_eq = int((g["IoU, equal area"] > g["IoU, equal area, shuffled"]).sum())
        parts.append(f"For {method}, the agent's region p > 0.5 (mean area {g['agent area'].mean():.2f} of the "
                     f"image; mean erase probability {g['mean p(erase)'].mean():.2f}) overlapped the Grad-CAM region "
                     f"(area {g['Grad-CAM area'].mean():.2f}) with a mean IoU of {g['IoU'].mean():.3f}, against "
                     f"{g['IoU, shuffled pairs'].mean():.3f} for the same masks paired with another image's map "
                     f"(above that chance level in {above} of {len(g)} runs); its most-erased pixels, as many as "
                     f"Grad-CAM's, gave {g['IoU, equal area'].mean():.3f} against "
                     f"{g['IoU, equal area, shuffled'].mean():.3f} (above in {above_eq} of {len(g)} runs).")
    return " ".join(parts)


def agent_traces(recorder: Recorder, units: pd.DataFrame) -> pd.DataFrame:
    """The per-update record of every APGA unit (``agent_trace``, :attr:`APGAHook.TRACE`) in long
    form: the unit's keys, ``update`` (1-based) and one column per recorded value."""
    frames = []
    for r in units[units["method"].astype(str).isin(["apga", "apga_faithful"])].itertuples():
        keys = {c: getattr(r, c) for c in ("flag", "size", "k", "seed")}
        found = find_unit(recorder, **keys, method=str(r.method))
        trace = recorder.scores(**found).get("agent_trace") if found else None
        if trace is None or not len(trace):
            continue
        frame = pd.DataFrame(trace, columns=list(APGAHook.TRACE))
        frames.append(frame.assign(**keys, method=str(r.method), update=np.arange(1, len(trace) + 1)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def agent_sentence(traces: pd.DataFrame, share: float = 0.1) -> str:
    """How the agents moved over training, per method: the number of agent updates, and the mean
    entropy (against ln 2, the most a binary action can have), erased area and reward of the first
    and of the last ``share`` of each run's updates, averaged over runs."""
    if not len(traces):
        return "No agent record was stored (no APGA unit ran)."
    parts = []
    for method, g in traces.groupby("method", sort=False):
        first, last, n = [], [], []
        for _, run in g.groupby(["flag", "size", "k", "seed"], sort=False):
            m = max(1, int(round(share * len(run))))
            first.append(run.iloc[:m][["entropy", "erase_area", "reward"]].mean())
            last.append(run.iloc[-m:][["entropy", "erase_area", "reward"]].mean())
            n.append(len(run))
        a, b = pd.concat(first, axis=1).mean(1), pd.concat(last, axis=1).mean(1)
        count = f"{min(n)}" if min(n) == max(n) else f"{min(n)} to {max(n)}"
        parts.append(f"{method}: {count} agent update{'' if max(n) == 1 else 's'} per run; from the first to the last "
                     f"{share:.0%} of them, the policy's entropy went from {a['entropy']:.3f} to {b['entropy']:.3f} "
                     f"nats per action (at most ln 2 = {np.log(2):.3f}), the erased area from {a['erase_area']:.2f} "
                     f"to {b['erase_area']:.2f} of the image and the reward from {a['reward']:.3f} to "
                     f"{b['reward']:.3f} (mean over {len(n)} runs).")
    return " ".join(parts)


def params_summary(cfg: FitConfig, pretrain: FitConfig) -> dict:
    """The two fit configs' fields that the page states (epochs, LR, schedule, monitor)."""
    pick = ("epochs", "lr", "schedule", "monitor", "patience")
    return {**{f"pretrain {k}": getattr(pretrain, k) for k in pick},
            **{f"method {k}": getattr(cfg, k) for k in pick}}


__all__ = ["METHODS", "CONTROLS", "REFERENCE_APGA", "faithful_group", "agent_settings", "k_label", "kshot",
           "check_protocol", "check_equal_looks", "probe_batch", "make_hook", "agent_for", "run_protocol",
           "method_units", "comparisons", "outcome", "outcome_sentence", "budget_table", "find_unit", "top_share",
           "agent_traces", "agent_sentence", "gallery_overlap", "overlap_sentence", "params_summary"]
