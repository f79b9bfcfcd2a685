"""The chapter's protocol as units of the shared :func:`helpers.experiment.train_and_test`.

* :func:`pretrain` (phase 1): the classifier trained on the mix with masks from the policy
  (``method="policy"``: REINFORCE, the sound default; ``"faithful"``: the reference's coupled
  loss), from the random control (``"random"``: an unconditional Beta of the policy's mean mask
  strength and concentration, measured from the same seed's policy run), or without masks
  (``"plain"``, for the transfer protocol). Its weights are kept (the "heated" model); the policy
  is stored beside it (``role=policy``) and its per-batch trace as a table. Evaluated on val only:
  without masks (``pretrain_val="unmasked"``, the default: the way the heated model is used), or,
  as the reference, under masks from the policy's unconditional Beta (``"unconditional"``;
  :class:`helpers.noise.hooks.UnconditionalValidation`), which then also selects the epoch.
* :func:`finetune` (phase 2): a heated model fine-tuned without masks at a lower LR with linear
  warm-up, tested once. :func:`plain` trains the same classifier for the same total number of
  epochs, without masks.
* :func:`transfer`: a pre-trained model (or none: scratch) fine-tuned on a held-out dataset.

``average_last`` (phase 2, the plain control and every transfer unit alike; 0: off) makes a unit's
final weights the mean of its last ``average_last`` epochs' weights
(:class:`helpers.noise.hooks.WeightAveraging`, the reference's checkpoint averaging) instead of its
best epoch on val. Phase 1 is never averaged (the reference's pre-training script keeps no per-epoch
weights).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..experiment import train_and_test
from ..models import create_model
from ..repro import seed_everything
from ..results import Recorder, unit_name
from ..train import FitConfig, NonFiniteLossError
from .hooks import (FaithfulCriterion, LinearWarmup, NoiseMaskHook, PolicyConfig, UnconditionalValidation,
                    averaging_config, averaging_hooks)
from .mask import MaskConfig
from .mix import MixDataset, per_dataset_metrics
from .policy import RandomBetaMasks, beta_for_mean, policy_from_config

__all__ = ["METHODS", "pretrain_keys", "pretrain", "policy_strength", "finetune", "plain", "transfer_state",
           "transfer", "load_policy", "per_dataset_table", "traces",
           "run_mix", "run_transfer", "mix_level", "step_overhead", "weights_note", "validation_note", "PRETRAIN_VAL"]

METHODS = ("plain", "random", "policy", "faithful")
PRETRAIN_VAL = ("unmasked", "unconditional")


def pretrain_keys(method: str, seed: int, **extra) -> dict:
    return {"stage": "pretrain", "method": method, **extra, "seed": seed}


def policy_strength(recorder: Recorder, seed: int, **extra) -> tuple[float, float]:
    """Mean mask value and mean Beta concentration ``a + b`` over the policy's phase-1 epochs."""
    h = recorder.history(**pretrain_keys("policy", seed, **extra))
    return float(h["noise/mask_mean"].mean()), float(h["noise/concentration"].mean())


def pretrain(recorder: Recorder, mix: MixDataset, method: str, seed: int, cfg: FitConfig, masks: MaskConfig,
             policy_cfg: PolicyConfig, *, model: str, batch_size: int, device: str = "auto",
             sampler: str | None = None, pretrain_val: str = "unmasked", **extra) -> dict:
    """Phase 1 on ``mix`` (see the module docstring); returns the unit's val metrics."""
    if pretrain_val not in PRETRAIN_VAL:
        raise ValueError(f"pretrain_val {pretrain_val!r} unknown; use {' or '.join(PRETRAIN_VAL)}")
    keys = pretrain_keys(method, seed, **extra)
    hooks, criterion, hook, extra_tag = [], None, None, ""
    seed_everything(10_000 + seed)   # the policy's initial weights and running averages, per seed
    if method in ("policy", "faithful"):
        policy = policy_from_config(masks.grid, mix.n_channels, policy_cfg)
        hook = NoiseMaskHook(policy, masks, "reinforce" if method == "policy" else "faithful", policy_cfg)
        criterion = FaithfulCriterion(hook) if method == "faithful" else None
    elif method == "random":
        a, b = beta_for_mean(*policy_strength(recorder, seed, **extra))
        hook = NoiseMaskHook(RandomBetaMasks(masks.grid, a, b), masks, "random", policy_cfg)
        extra_tag = f" beta=({a:.6f},{b:.6f})"
    elif method != "plain":
        raise ValueError(f"pre-training method {method!r} unknown; use plain, random, policy or faithful")
    hooks = [hook] if hook is not None else []
    tag = f"masks={dataclasses.asdict(masks)} policy={dataclasses.asdict(policy_cfg)}{extra_tag}" if hook else None
    scorer = UnconditionalValidation(hook, mix.task, seed) if hook is not None and pretrain_val == "unconditional" else None
    out = train_and_test(recorder, mix, model, seed, cfg, batch_size=batch_size, device=device, hooks=hooks,
                         criterion=criterion, unit=keys, keep_model=True, evaluate_on=("val",), sampler=sampler,
                         data_tag=tag, scorer=scorer)
    if hook is not None and hook.trace:   # fit ran now (trained, or restored from its checkpoint): store them
        recorder.save_table(pd.DataFrame(hook.trace), f"trace__{unit_name(**keys)}")
        if method != "random":
            recorder.save_model({**keys, "role": "policy"}, hook.policy.state_dict())
    return out


def _warmup_cfg(cfg: FitConfig) -> FitConfig:
    return dataclasses.replace(cfg, schedule="none")


def finetune(recorder: Recorder, mix: MixDataset, method: str, seed: int, cfg: FitConfig, *, model: str,
             batch_size: int, warmup_epochs: float, start_factor: float = 0.01, device: str = "auto",
             sampler: str | None = None, average_last: int = 0) -> dict:
    """Phase 2: the heated model of ``method`` fine-tuned on ``mix`` without masks (``cfg`` holds the
    lower LR and phase 2's epochs; the schedule is the linear warm-up, then constant), tested once."""
    init = recorder.model_path(**pretrain_keys(method, seed))
    steps = -(-len(mix["train"]) // batch_size)
    return train_and_test(recorder, mix, model, seed, averaging_config(_warmup_cfg(cfg), average_last),
                          batch_size=batch_size, device=device,
                          hooks=[LinearWarmup(warmup_epochs, steps, start_factor),
                                 *averaging_hooks(average_last, cfg.epochs)], init_from=init,
                          unit={"stage": "finetune", "method": method, "seed": seed}, sampler=sampler,
                          data_tag=f"warmup={warmup_epochs},{start_factor}",
                          keep_model=True)   # the summary page rebuilds it to test it on corrupted images


def plain(recorder: Recorder, mix: MixDataset, seed: int, cfg: FitConfig, *, model: str, batch_size: int,
          device: str = "auto", sampler: str | None = None, average_last: int = 0) -> dict:
    """Control (a): the classifier trained without masks for ``cfg.epochs`` (phase 1 + phase 2)."""
    return train_and_test(recorder, mix, model, seed, averaging_config(cfg, average_last), batch_size=batch_size,
                          device=device, hooks=averaging_hooks(average_last, cfg.epochs),
                          unit={"stage": "finetune", "method": "plain", "seed": seed}, sampler=sampler,
                          keep_model=True)   # the summary page rebuilds it to test it on corrupted images


def transfer_state(pretrained: Mapping[str, torch.Tensor], model: str, num_classes: int, in_chans: int,
                   seed: int, **model_kwargs) -> dict:
    """A full state dict for ``model`` with ``num_classes`` outputs: every tensor of ``pretrained``
    whose name and shape fit, the rest (the classifier head of another label space) freshly
    initialised with ``seed``. Raises when nothing but the head would transfer."""
    seed_everything(seed)
    fresh = create_model(model, num_classes=num_classes, in_chans=in_chans, **model_kwargs).state_dict()
    out, kept = {}, 0
    for k, v in fresh.items():
        p = pretrained.get(k)
        if p is not None and p.shape == v.shape:
            out[k], kept = p.clone(), kept + 1
        else:
            out[k] = v
    if kept < len(fresh) // 2:
        raise ValueError(f"only {kept} of {len(fresh)} tensors of {model} match the pre-trained weights; "
                         f"were they made by another architecture or channel count?")
    return out


def transfer(recorder: Recorder, target, init: str, k: int, seed: int, cfg: FitConfig, ft_cfg: FitConfig, *,
             held_out: str, model: str, batch_size: int, warmup_epochs: float, start_factor: float = 0.01,
             device: str = "auto", average_last: int = 0) -> dict:
    """Fine-tune on the held-out ``target`` (already a k-shot subset) from the leave-one-out
    pre-training of ``init`` (``"policy"`` or ``"plain"``), or train from scratch (``init="scratch"``,
    with ``cfg``: the base LR and schedule)."""
    unit = {"stage": "transfer", "held_out": held_out, "init": init, "k": k, "seed": seed}
    if init == "scratch":
        return train_and_test(recorder, target, model, seed, averaging_config(cfg, average_last), batch_size=batch_size,
                              device=device, unit=unit, hooks=averaging_hooks(average_last, cfg.epochs))
    state = recorder.load_model(**pretrain_keys(init, seed, held_out=held_out))
    start = transfer_state(state, model, target.n_classes, target.n_channels, seed)
    steps = -(-len(target["train"]) // batch_size)
    return train_and_test(recorder, target, model, seed, averaging_config(_warmup_cfg(ft_cfg), average_last),
                          batch_size=batch_size, device=device,
                          hooks=[LinearWarmup(warmup_epochs, steps, start_factor),
                                 *averaging_hooks(average_last, ft_cfg.epochs)],
                          init_from=start, unit=unit, data_tag=f"warmup={warmup_epochs},{start_factor}")


def load_policy(recorder: Recorder, method: str, seed: int, grid: int, in_chans: int, cfg: PolicyConfig, **extra):
    """The policy stored beside a phase-1 unit (``role=policy``), rebuilt and loaded."""
    policy = policy_from_config(grid, in_chans, cfg)
    policy.load_state_dict(recorder.load_model(**pretrain_keys(method, seed, **extra), role="policy"))
    return policy.eval()


def per_dataset_table(recorder: Recorder, mix: MixDataset, split: str = "test") -> pd.DataFrame:
    """One row per (method, seed, dataset) of the phase-2 units, scored in each dataset's labels."""
    rows = []
    for u in recorder.units():
        keys = u["keys"]
        if keys.get("stage") != "finetune":
            continue
        sc = recorder.scores(**keys)
        for r in per_dataset_metrics(mix, sc[f"{split}_scores"], sc[f"{split}_labels"], sc[f"{split}_index"], split):
            rows.append({"method": keys["method"], "seed": keys["seed"], **r})
    return pd.DataFrame(rows)


def traces(recorder: Recorder) -> pd.DataFrame:
    """The stored per-batch traces of the phase-1 units (mix only), with ``method`` and ``seed``."""
    frames = []
    for u in recorder.units():
        keys = u["keys"]
        path = recorder.root / "tables" / f"trace__{unit_name(**keys)}.csv"
        if keys.get("stage") == "pretrain" and "held_out" not in keys and path.is_file():
            frames.append(pd.read_csv(path).assign(method=keys["method"], seed=keys["seed"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def validation_note(pretrain_val: str) -> str:
    """The page's sentence on how phase 1's val is scored (``pretrain_val``)."""
    if pretrain_val == "unconditional":
        return ("**Phase 1's validation.** As in the reference, phase 1's val is scored under masks drawn from the "
                "unconditional Beta: the policy's running averages Beta(exp b_α, exp b_β) at that epoch (the random "
                "control: its own fixed Beta), with the same random draws at every epoch (`pretrain_val: "
                "unconditional`). These masked scores select phase 1's epoch and are its val curves below.")
    return ("**Phase 1's validation.** Phase 1's val is scored without masks, the way the heated model is used "
            "(`pretrain_val: unmasked`); the reference scores it under masks from the policy's unconditional "
            "Beta, which `pretrain_val: unconditional` does here.")


def weights_note(average_last: int, *, finetune_epochs: int, warmup_epochs: float, total_epochs: int) -> str:
    """The page's sentence on which weights each unit keeps: the best epoch on val, or (``average_last``
    >= 1) the mean of the last epochs' weights, with what differs from the reference at this budget."""
    if not average_last:
        return ("**Which weights are kept.** Every unit keeps its best epoch on val (`average_last: 0`). The "
                "reference instead averages the weights of its runs' last three epochs (`utils/weight_averaging.py`); "
                "`average_last: 3` does that here, for every phase-2, plain and transfer unit alike.")
    k = int(average_last)
    text = (f"**Which weights are kept.** Every phase-2 unit, the plain control and every transfer unit ends with the "
            f"mean of its weights after each of its last {k} epochs (`average_last: {k}`; the reference's checkpoint "
            f"averaging, `utils/weight_averaging.py`, averages its last three; BatchNorm's running statistics are "
            f"averaged too, as there). There is no selection on val for these units; their val and test metrics "
            f"are those of the averaged weights, while the learning curves below show each epoch's own weights. "
            f"Phase 1 keeps its best epoch on val (the reference's pre-training script keeps no per-epoch weights "
            f"to average).")
    if k > finetune_epochs:
        ep = f"{finetune_epochs} epoch" + ("s, so its units average all of them" if finetune_epochs != 1 else
                                           ", so its units average that one")
        text += (f" Phase 2 has only {ep}, and the plain control ({total_epochs} epochs) averages its last "
                 f"{min(k, total_epochs)}.")
    if finetune_epochs - min(k, finetune_epochs) < warmup_epochs:
        text += (" At this budget the averaged epochs of phase 2 include the linear warm-up; the reference's "
                 "averaged epochs all come after it.")
    return text


def run_mix(recorder: Recorder, mix: MixDataset, methods: Sequence[str], seeds: Sequence[int], base: FitConfig, *,
            pretrain_epochs: int, finetune_epochs: int, finetune_lr: float, warmup_epochs: float,
            warmup_start: float, masks: MaskConfig, policy_cfg: PolicyConfig, model: str, batch_size: int,
            device: str = "auto", sampler: str | None = None, average_last: int = 0,
            pretrain_val: str = "unmasked") -> pd.DataFrame:
    """Every unit of the main comparison, per seed: phase 1 (policy first: the random control is
    matched to it), phase 2 for each noise method, and the plain control for the same total epochs.
    Returns the ``faithful`` phase-1 units whose loss diverged (NaN/inf), which are then left out."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "plain" not in methods:
        raise ValueError(f"methods {list(methods)}: each must be one of {', '.join(METHODS)}, and plain must be "
                         f"among them (every noise method is judged against it)")
    if "random" in methods and "policy" not in methods:
        raise ValueError("the random control is matched to the policy's mask strength: add 'policy' to methods")
    pre = dataclasses.replace(base, epochs=pretrain_epochs)
    ft = dataclasses.replace(base, epochs=finetune_epochs, lr=finetune_lr)
    order = [m for m in ("policy", "faithful", "random") if m in methods]
    failed = []
    for seed in seeds:
        for method in order:
            try:
                pretrain(recorder, mix, method, seed, pre, masks, policy_cfg, model=model, batch_size=batch_size,
                         device=device, sampler=sampler, pretrain_val=pretrain_val)
            except NonFiniteLossError as exc:
                if method != "faithful":
                    raise
                failed.append({"method": method, "seed": seed, "error": str(exc).split(". Fix")[0]})
                continue   # the reference's coupled loss can diverge (its factor can be negative): reported
            finetune(recorder, mix, method, seed, ft, model=model, batch_size=batch_size, device=device,
                     warmup_epochs=warmup_epochs, start_factor=warmup_start, sampler=sampler,
                     average_last=average_last)
        plain(recorder, mix, seed, dataclasses.replace(base, epochs=pretrain_epochs + finetune_epochs), model=model,
              batch_size=batch_size, device=device, sampler=sampler, average_last=average_last)
    return pd.DataFrame(failed, columns=["method", "seed", "error"])


def run_transfer(recorder: Recorder, loo: MixDataset, target, held_out: str, k_shots: Sequence[int],
                 seeds: Sequence[int], base: FitConfig, *, pretrain_epochs: int, transfer_epochs: int,
                 finetune_lr: float, warmup_epochs: float, warmup_start: float, masks: MaskConfig,
                 policy_cfg: PolicyConfig, model: str, batch_size: int, device: str = "auto",
                 average_last: int = 0, pretrain_val: str = "unmasked") -> pd.DataFrame:
    """The unseen-concept protocol: per seed, pre-train on ``loo`` (the mix without ``held_out``) with
    the policy and plainly, then fine-tune each (and a scratch model) on ``k`` images per class of
    ``target``. Returns one row per transfer unit (``init``, ``k``, ``seed`` and its test metrics)."""
    from .mix import kshot

    pre = dataclasses.replace(base, epochs=pretrain_epochs)
    rows = []
    for seed in seeds:
        for method in ("policy", "plain"):
            pretrain(recorder, loo, method, seed, pre, masks, policy_cfg, model=model, batch_size=batch_size,
                     device=device, pretrain_val=pretrain_val, held_out=held_out)
        for k in k_shots:
            few = kshot(target, k, seed)
            for init in ("policy", "plain", "scratch"):
                m = transfer(recorder, few, init, k, seed, dataclasses.replace(base, epochs=transfer_epochs),
                             dataclasses.replace(base, epochs=transfer_epochs, lr=finetune_lr), held_out=held_out,
                             model=model, batch_size=batch_size, warmup_epochs=warmup_epochs,
                             start_factor=warmup_start, device=device, average_last=average_last)
                rows.append({"init": init, "k": k, "seed": seed, "n_train": len(few["train"]), **m})
    return pd.DataFrame(rows)


def mix_level(per_ds: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The per-dataset metrics averaged over datasets: one row per (method, seed)."""
    return per_ds.groupby(["method", "seed"], as_index=False)[list(metrics)].mean()


def step_overhead(recorder: Recorder) -> pd.DataFrame:
    """Seconds per training epoch of phase 1 with masks against the plain control's epochs (the
    mix's units; wall times on whatever else the machine ran meanwhile)."""
    rows = []
    for u in recorder.units():
        k = u["keys"]
        if "held_out" in k or k.get("stage") not in ("pretrain", "finetune"):
            continue
        if k["stage"] == "finetune" and k["method"] != "plain":
            continue
        h = recorder.history(**k)
        rows.append({"method": k["method"], "seed": k["seed"], "epoch_s": float(h["time_s"].mean())})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    out = df.groupby("method", as_index=False)["epoch_s"].mean()
    plain_s = out.loc[out["method"] == "plain", "epoch_s"]
    out["ratio_to_plain"] = out["epoch_s"] / float(plain_s.iloc[0]) if len(plain_s) else np.nan
    return out
