"""The one training loop every notebook uses (after torchvision's ``references/classification``).

``train_one_epoch`` and ``evaluate`` stay short; :func:`fit` composes them with the optimiser,
schedule, gradient clipping, early stopping, best-checkpoint selection on a validation metric,
mixed precision on GPU, resumable checkpoints and DistributedDataParallel. Methods differ only by
the model, loader, and :class:`Hook` they hand in.

Extension points a method uses instead of copying the loop:

* ``Hook`` (:class:`Hook`): ``on_fit_start(model, optimizer, device)``, ``transform_batch(x, y, model)``
  before the forward pass, ``on_batch_end(x, y, logits, loss_per_sample)`` after it (the policy's
  reward without a second forward pass), ``after_step(x, y, model, optimizer)`` after the optimiser
  step (a hook's own extra update, e.g. a second classifier step on masked images),
  ``on_epoch_end(epoch, logs)``; its ``state_dict`` is
  checkpointed and the state at the best epoch is restored with the best weights. Its own forward
  passes can take the loop's precision through ``Hook.autocast()`` (the APGA chapter's do).
* ``fit(..., criterion=, param_groups=, validate=)``: a per-sample loss, optimiser parameter groups
  (e.g. a lower LR for a pre-trained backbone) and a validation callable for objectives that are not
  classification. Each defaults to today's behaviour.
"""
from __future__ import annotations

import copy
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ParamsError, check_group
from .metrics import classification_metrics
from .losses import Criterion, make_criterion, reduce_loss, to_scores  # noqa: F401  (public here too)
from .results import atomic_write_bytes


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; finished work (checkpoints, units) is kept."""


@dataclass
class FitConfig:
    """Everything :func:`fit` can be told. Build from params with :meth:`from_params`."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"            # adamw | sgd
    momentum: float = 0.9               # sgd only
    schedule: str = "cosine"            # none | onecycle | cosine | plateau
    pct_start: float = 0.3              # onecycle warm-up share
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    min_lr: float = 0.0                 # floor of the LR: plateau's min_lr and cosine's eta_min
    grad_clip: float | None = None      # max global grad norm; None = off
    patience: int | None = None         # early stopping patience in epochs; None = off
    min_delta: float = 0.0              # smallest change of the monitor that counts as better
    min_epochs: int = 1                 # never stop before this many epochs
    monitor: str = "val/auc"            # selection metric, always on the validation split
    mode: str = "auto"                  # max | min | auto (min for losses)
    amp: bool = True                    # bf16 autocast on CUDA (training and evaluation); ignored on CPU
    cpu_amp: bool = False               # bf16 autocast of the training step on CPU too (AMX: 1.2-1.8x faster here;
                                        # benchmarks/cpu_amp.py); evaluation stays fp32. It changes the numbers: off
                                        # unless a profile asks (the full profiles do, as a GPU run is bf16 too)
    label_smoothing: float = 0.0
    progress: str = "auto"              # auto | bar | log | none
    channels_last: bool = True          # NHWC memory format: 1.2-1.5x faster convs on CPU

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> "FitConfig":
        """A config from a params mapping (a notebook's ``fit`` group): unknown keys and wrong types
        are refused, naming the key and the valid ones; the rest keep the field defaults."""
        merged = {**dict(params), **overrides}
        check_group("fit", merged, f"{cls.__module__}:{cls.__qualname__}", "fit config")
        cfg = cls(**merged)
        if cfg.optimizer not in ("adamw", "sgd"):
            raise ParamsError(f"optimizer '{cfg.optimizer}' unknown; use adamw or sgd")
        if cfg.schedule not in ("none", "onecycle", "cosine", "plateau"):
            raise ParamsError(f"schedule '{cfg.schedule}' unknown; use none, onecycle, cosine or plateau")
        return cfg

    @property
    def maximize(self) -> bool:
        return self.mode == "max" or (self.mode == "auto" and "loss" not in self.monitor)


class Hook:
    """Extension points of the loop; methods are no-ops unless a method overrides them.

    Called in this order: ``on_fit_start`` once (after resume, before the first epoch);
    per batch ``transform_batch`` before the forward pass (e.g. a policy's noise mask or an
    adversarial erasing step) and ``on_batch_end`` after the loss (``loss_per_sample`` is detached,
    shape ``(B,)``, and averages to the batch's logged loss; ``x`` is the transformed batch);
    ``after_step`` after the optimiser step of the batch (before a per-batch LR schedule steps), where
    a hook may take its own extra update with the same ``optimizer``; ``on_epoch_end`` after
    validation, which may return extra metrics for the history.
    ``state_dict``/``load_state_dict`` are checkpointed every epoch, and the state at the best
    epoch is restored at the end of :func:`fit`, beside the best weights. A state must hold only
    tensors and plain Python values (checkpoints load with ``weights_only=True``).

    A hook's own forward passes (an agent, a mask network, an extra classifier step) can take the
    loop's training precision through :meth:`autocast`, which :func:`fit` sets (:func:`set_hook_precision`)
    before ``on_fit_start``: then a loss the hook compares with ``loss_per_sample`` is taken in the
    same precision, and a bf16 fit (``amp`` on CUDA, ``cpu_amp`` on CPU) runs the hook in bf16 too.
    """

    #: the loop's training precision (set by :func:`set_hook_precision`): bf16 autocast on or off
    autocast_enabled: bool = False
    autocast_device: str = "cpu"

    def autocast(self, enabled: bool = True):
        """A context for the hook's own forward passes in the loop's training precision (bf16
        autocast, or nothing; ``enabled=False``: float32 whatever the loop's); cast outputs to
        float32 before a loss, as the loop does."""
        return torch.autocast(device_type=self.autocast_device, dtype=torch.bfloat16,
                              enabled=self.autocast_enabled and enabled)

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        pass

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def on_batch_end(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                     loss_per_sample: torch.Tensor) -> None:
        pass

    def after_step(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module,
                   optimizer: torch.optim.Optimizer) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class FitResult:
    """What :func:`fit` returns; ``model`` holds the best weights (by ``monitor`` on val)."""

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int
    best_score: float
    stopped_early: bool
    resumed_from: int | None = None
    wall_s: float = 0.0


class EarlyStopping:
    """Patience-based stopping with ``min_delta`` and ``min_epochs`` (epochs are 1-based)."""

    def __init__(self, patience: int | None, min_delta: float = 0.0, min_epochs: int = 1, maximize: bool = True):
        self.patience, self.min_delta, self.min_epochs, self.maximize = patience, min_delta, min_epochs, maximize
        self.best = -math.inf if maximize else math.inf
        self.best_epoch = 0
        self.bad_epochs = 0

    def improved(self, score: float) -> bool:
        if math.isnan(score):
            return False
        return score > self.best + self.min_delta if self.maximize else score < self.best - self.min_delta

    def step(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; return True when it is the new best."""
        if self.improved(score):
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def stop_now(self, epoch: int) -> bool:
        return epoch >= self.min_epochs and self.should_stop

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


# ---- small pieces ----------------------------------------------------------------------------
def _amp_on(device: torch.device, amp: bool, cpu_amp: bool = False) -> bool:
    return (amp and device.type == "cuda") or (cpu_amp and device.type == "cpu")


def _autocast(device: torch.device, amp: bool, cpu_amp: bool = False):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=_amp_on(device, amp, cpu_amp))


def set_hook_precision(hooks: Sequence[Hook], device, amp: bool = True, cpu_amp: bool = False) -> None:
    """Give ``hooks`` the training precision of a loop run with ``amp`` / ``cpu_amp`` on ``device``
    (:meth:`Hook.autocast`); :func:`fit` calls it, a hand-made loop over :func:`train_one_epoch` should."""
    device = torch.device(device)
    for hook in hooks:
        hook.autocast_device, hook.autocast_enabled = device.type, _amp_on(device, amp, cpu_amp)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise torch.distributed from ``torchrun``'s environment; returns (rank, world_size).

    Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) it does nothing and returns (0, 1).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _progress_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    env = os.environ.get("RLMED_PROGRESS")
    if env:
        return env
    return "bar" if "ipykernel" in sys.modules else "log"


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module, optimizer: torch.optim.Optimizer, *,
                    device: torch.device, epoch: int, scheduler=None, grad_clip: float | None = None,
                    amp: bool = True, hooks: Sequence[Hook] = (), channels_last: bool = False,
                    cpu_amp: bool = False) -> dict:
    """One pass over ``loader``; steps a per-batch ``scheduler`` if given. Returns train/* metrics.
    The forward pass runs under bf16 autocast with ``amp`` on CUDA, or ``cpu_amp`` on CPU."""
    model.train()
    total, loss_sum, correct, grad_norm_sum, steps = 0, 0.0, 0, 0.0, 0
    single_label = False
    for step, (x, y) in enumerate(loader):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for hook in hooks:
            x, y = hook.transform_batch(x, y, model)
        with _autocast(device, amp, cpu_amp):
            logits = model(x)
            per_sample = criterion(logits.float(), y)
            loss = reduce_loss(criterion, per_sample, y)
        if not torch.isfinite(loss):
            lr = optimizer.param_groups[0]["lr"]
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {epoch}, batch {step} (lr {lr:.3g}). "
                f"Fix: lower lr, set grad_clip (e.g. 1.0), or check the inputs for NaN. "
                f"The last finished epoch is kept in the checkpoint.")
        for hook in hooks:
            hook.on_batch_end(x, y, logits.detach(), per_sample.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            grad_norm_sum += float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        optimizer.step()
        for hook in hooks:
            hook.after_step(x, y, model, optimizer)
        if scheduler is not None:
            scheduler.step()
        n = len(y)
        total += n
        steps += 1
        loss_sum += loss.item() * n
        if y.ndim == 1:
            single_label = True
            correct += (logits.argmax(1) == y).sum().item()
    out = {"train/loss": loss_sum / max(total, 1)}
    if single_label:  # no train accuracy for multi-label targets (it would read 0)
        out["train/acc"] = correct / total
    if grad_clip:
        out["train/grad_norm"] = grad_norm_sum / max(steps, 1)
    return out


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, task: str, *, device: torch.device | None = None,
            amp: bool = True, criterion: nn.Module | None = None,
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores (probabilities), labels and mean loss of ``model`` over ``loader``."""
    model.eval()
    device = device or next(model.parameters()).device
    scores, labels, loss_sum, total = [], [], 0.0, 0
    for x, y in loader:
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(x).float()
        if criterion is not None:
            loss_sum += reduce_loss(criterion, criterion(logits, y), y).item() * len(y)
        total += len(y)
        scores.append(to_scores(logits, task).cpu())
        labels.append(y.cpu())
    return torch.cat(scores).numpy(), torch.cat(labels).numpy(), loss_sum / max(total, 1)


def evaluate(model: nn.Module, loader: Iterable, task: str, *, prefix: str = "val", device=None,
             amp: bool = True, criterion: nn.Module | None = None,
             channels_last: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    """MedMNIST metrics of ``model`` on ``loader`` as ``{prefix}/acc`` etc., plus raw scores and labels."""
    scores, labels, loss = predict(model, loader, task, device=device, amp=amp, criterion=criterion,
                                   channels_last=channels_last)
    metrics = {f"{prefix}/{k}": v for k, v in classification_metrics(labels, scores, task).items()}
    if criterion is not None:
        metrics[f"{prefix}/loss"] = loss
    return metrics, scores, labels


def make_optimizer(model: nn.Module, cfg: FitConfig, param_groups: Sequence[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD over the model's parameters, or over ``param_groups`` (torch's format: dicts with
    ``params`` and optional per-group ``lr``/``weight_decay``; the rest default to ``cfg``)."""
    params = list(param_groups) if param_groups is not None else model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: FitConfig, steps_per_epoch: int):
    """Returns (scheduler, per_batch). OneCycle and cosine step per batch, plateau per epoch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs if len(lrs) > 1 else cfg.lr, total_steps=total,
                                                   pct_start=cfg.pct_start, div_factor=10,
                                                   final_div_factor=100), True
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.min_lr), True
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max" if cfg.maximize else "min", factor=cfg.plateau_factor,
            patience=cfg.plateau_patience, min_lr=cfg.min_lr), False
    return None, False


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}


def _plain(obj: Any) -> Any:
    """``obj`` with NumPy scalars turned into Python ones and tensors copied to CPU, so a
    checkpoint holding it loads with ``torch.load(weights_only=True)``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint written by :func:`fit`, loaded with ``weights_only=True`` (no unpickling)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(model: nn.Module, train_loader, val_loader, task: str, cfg: FitConfig, *,
        device: torch.device | str = "cpu", checkpoint: str | os.PathLike | None = None,
        hooks: Sequence[Hook] = (), class_weights: torch.Tensor | None = None, desc: str = "",
        criterion: Callable | None = None, param_groups: Sequence[dict] | None = None,
        validate: Callable[[nn.Module], Mapping[str, float]] | None = None) -> FitResult:
    """Train ``model`` and keep the weights that score best on the validation ``monitor``.

    ``checkpoint`` (a file, normally under :func:`helpers.config.cache_dir`) is written after every
    epoch; calling ``fit`` again with the same path and config resumes from the last finished
    epoch (weights, optimiser, schedule, loader order, hooks, CPU and CUDA RNG), and a finished fit
    returns its stored result without training. A NaN or infinite loss raises
    :class:`NonFiniteLossError` and keeps the last good checkpoint; a monitor that is NaN at every
    epoch raises :class:`NonFiniteLossError` instead of returning the untrained weights.

    Options (each defaults to plain supervised classification):

    * ``criterion(logits, y) -> (B,)`` per-sample losses (default :func:`make_criterion`); the batch
      loss is its ``reduce`` (see :class:`Criterion`) or the mean.
    * ``param_groups``: torch optimiser groups, e.g. ``[{"params": backbone.parameters(), "lr": 1e-4},
      {"params": head.parameters()}]``; groups without ``lr`` use ``cfg.lr``.
    * ``validate(model) -> {"val/...": value}``: replaces the classification evaluation of
      ``val_loader`` (which may then be ``None``); ``cfg.monitor`` must be one of its keys.
    """
    start = time.perf_counter()
    device = torch.device(device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    distributed = dist.is_available() and dist.is_initialized()
    train_model = nn.parallel.DistributedDataParallel(model) if distributed else model
    weight = class_weights.to(device) if class_weights is not None else None
    criterion = criterion if criterion is not None else make_criterion(task, weight, cfg.label_smoothing)
    eval_criterion = make_criterion(task)
    optimizer = make_optimizer(model, cfg, param_groups)
    scheduler, per_batch = make_scheduler(optimizer, cfg, len(train_loader))
    stopper = EarlyStopping(cfg.patience, cfg.min_delta, cfg.min_epochs, cfg.maximize)
    n_val = len(val_loader) if val_loader is not None else None
    data_shape = (len(train_loader), getattr(train_loader, "num_samples", None), n_val)
    signature = repr((asdict(cfg), type(model).__name__, sum(p.numel() for p in model.parameters()), data_shape))
    rows: list[dict] = []
    best_state = _cpu_state(model)
    best_hooks = [_plain(h.state_dict()) for h in hooks]
    first_epoch, resumed_from, stopped_early = 1, None, False
    ckpt = Path(checkpoint) if checkpoint else None

    if ckpt is not None and ckpt.is_file():
        state = load_checkpoint(ckpt)
        if state.get("signature") == signature:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler"):
                scheduler.load_state_dict(state["scheduler"])
            stopper.load_state_dict(state["stopper"])
            if hasattr(train_loader, "load_state_dict"):
                train_loader.load_state_dict(state["loader"])
            for hook, hs in zip(hooks, state.get("hooks", [])):
                hook.load_state_dict(hs)
            _set_rng_state(state["rng"])
            rows, best_state = state["history"], state["best_state"]
            best_hooks = state.get("best_hooks", best_hooks)
            first_epoch = state["epoch"] + 1
            resumed_from = state["epoch"]
            stopped_early = state.get("stopped_early", False)
            if state.get("finished"):
                first_epoch = cfg.epochs + 1
        else:
            print(f"checkpoint {ckpt} was made with another config or model; starting afresh", flush=True)

    set_hook_precision(hooks, device, cfg.amp, cfg.cpu_amp)
    for hook in hooks:
        hook.on_fit_start(model, optimizer, device)
    mode = _progress_mode(cfg.progress) if is_main_process() else "none"
    bar = None
    if mode == "bar":
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.epochs, initial=first_epoch - 1, desc=desc or "epochs", unit="ep", leave=True)

    for epoch in range(first_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        logs = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        logs.update(train_one_epoch(train_model, train_loader, criterion, optimizer, device=device, epoch=epoch,
                                    scheduler=scheduler if per_batch else None, grad_clip=cfg.grad_clip,
                                    amp=cfg.amp, hooks=hooks, channels_last=cfg.channels_last,
                                    cpu_amp=cfg.cpu_amp))
        if distributed:  # BatchNorm running stats drift apart per rank: evaluate and keep rank 0's everywhere
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
        if validate is not None:
            logs.update(validate(model))
        else:
            val_metrics, _, _ = evaluate(model, val_loader, task, device=device, amp=cfg.amp,
                                         criterion=eval_criterion, channels_last=cfg.channels_last)
            logs.update(val_metrics)
        for hook in hooks:
            logs.update(hook.on_epoch_end(epoch, logs) or {})
        if cfg.monitor not in logs:
            raise ParamsError(f"monitor '{cfg.monitor}' is not a logged metric; logged: {sorted(logs)}")
        logs = _plain(logs)
        score = float(logs[cfg.monitor])
        if scheduler is not None and not per_batch:
            scheduler.step(score)
        if stopper.step(score, epoch):
            best_state = _cpu_state(model)
            best_hooks = [_plain(h.state_dict()) for h in hooks]
        logs["time_s"] = time.perf_counter() - t0
        rows.append(logs)
        stop = stopper.stop_now(epoch)
        stopped_early = stop and epoch < cfg.epochs
        finished = stop or epoch == cfg.epochs
        if ckpt is not None and is_main_process():
            _save_checkpoint(ckpt, {
                "signature": signature, "epoch": epoch, "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                "stopper": stopper.state_dict(), "rng": _rng_state(),
                "loader": train_loader.state_dict() if hasattr(train_loader, "state_dict") else None,
                "hooks": [_plain(h.state_dict()) for h in hooks], "best_hooks": best_hooks, "history": rows,
                "best_state": best_state, "finished": finished, "stopped_early": stopped_early})
        _report(mode, bar, desc, logs, cfg.monitor)
        if stop:
            break
    if bar is not None:
        bar.close()
    if rows and stopper.best_epoch == 0:
        raise NonFiniteLossError(
            f"the monitor '{cfg.monitor}' was NaN at every one of {len(rows)} epoch(s), so no epoch can be selected "
            f"(the weights would be the untrained ones). Fix: choose a monitor that is defined on this validation "
            f"split (e.g. 'val/acc' or 'val/loss' when val/auc is undefined because val holds one class), or check "
            f"the model's outputs for NaN.")
    model.load_state_dict(best_state)
    for hook, hs in zip(hooks, best_hooks):
        hook.load_state_dict(hs)
    history = pd.DataFrame(rows)
    best_epoch = stopper.best_epoch
    return FitResult(model, history, best_epoch, stopper.best, stopped_early, resumed_from,
                     time.perf_counter() - start)


def _report(mode: str, bar, desc: str, logs: dict, monitor: str) -> None:
    keys = ("train/loss", "val/loss", "val/acc", monitor)
    shown = {k: logs[k] for k in dict.fromkeys(keys) if k in logs}
    if mode == "bar" and bar is not None:
        bar.set_postfix({k.split("/")[-1] if k != monitor else k: f"{v:.4f}" for k, v in shown.items()})
        bar.update(1)
    elif mode == "log":
        text = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
        line = f"{desc + ' ' if desc else ''}epoch {logs['epoch']:>3}  {text}  ({logs['time_s']:.1f}s)"
        log_file = os.environ.get("RLMED_LOG_FILE")
        if log_file:  # pages stay free of raw logs: the runner points this at the run's results folder
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "a") as fh:
                fh.write(line + "\n")
        else:
            print(line, flush=True)
