"""bf16 autocast on CPU (``FitConfig.cpu_amp``): training speed and the trained models, side by side.

Run from the repository root (about 2 minutes on 2 idle CPU cores with the defaults)::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/cpu_amp.py
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/cpu_amp.py --models cnn resnet --no-fit

1. **Speed.** For each model the chapters' full profiles train (the fold CNN at its full widths, the
   noise chapter's ResNet, the ensemble's SE-ResNet member and the DenseNet-121 expert), the same
   batches go through :func:`helpers.train.train_one_epoch` (channels_last, as ``fit`` does) in fp32
   and with ``cpu_amp``, interleaved round by round so a drifting load hits both alike. It prints
   images/s of each and the ratio. oneDNN runs bf16 convolutions on AMX tiles where the CPU has them
   (``amx_bf16`` in ``/proc/cpuinfo``); without AMX bf16 can be slower than fp32, which this shows.
2. **The trained models.** The same ``fit`` (same seed, same batches) on a stratified subset of
   real PneumoniaMNIST, once in fp32 and once with ``cpu_amp``: val loss, ACC and AUC of each, so a
   reader sees what bf16 changes in the numbers, not only in the time (``--no-fit`` skips it).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import device_name, loadavg  # noqa: E402
from helpers.models import create_model  # noqa: E402
from helpers.train import FitConfig, make_optimizer, train_one_epoch  # noqa: E402

# name -> (registry model, classes, channels, batch, kwargs): each as a full profile trains it
MODELS = {
    "cnn": ("cnn", 11, 1, 128, {"widths": [32, 64, 128]}),           # folds (full)
    "resnet": ("resnet", 20, 3, 128, {}),                           # noise (full): 3 channels, the 20 joint labels
    "seresnet": ("seresnet_mura", 2, 1, 32, {}),                    # ensemble members (full)
    "densenet121": ("densenet121", 2, 1, 32, {"small_input": True}),  # ensemble expert (full)
}


def cpu_has_amx() -> bool:
    """Whether ``/proc/cpuinfo`` lists ``amx_bf16`` (False where there is no such file)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def speed(name: str, steps: int, rounds: int, size: int = 28) -> dict:
    """Images/s of ``train_one_epoch`` over the same ``steps`` batches, fp32 and ``cpu_amp``."""
    model_name, classes, chans, batch, kwargs = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, chans, size, size, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
               for _ in range(steps)]
    setups = {}
    for mode in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=classes, in_chans=chans, **kwargs)
        model = model.to(memory_format=torch.channels_last)
        setups[mode] = (model, make_optimizer(model, FitConfig()))
    crit = torch.nn.CrossEntropyLoss(reduction="none")
    cpu = torch.device("cpu")

    def run(mode, loader):
        model, opt = setups[mode]
        return train_one_epoch(model, loader, crit, opt, device=cpu, epoch=1, channels_last=True, cpu_amp=mode == "bf16")

    for mode in setups:   # warm-up: oneDNN picks its kernels on the first calls
        run(mode, batches[:2])
    total = dict.fromkeys(setups, 0.0)
    for _ in range(rounds):
        for mode in setups:
            t = time.perf_counter()
            run(mode, batches)
            total[mode] += time.perf_counter() - t
    ips = {mode: rounds * steps * batch / total[mode] for mode in setups}
    return {"model": name, "batch": batch, "fp32_img_s": ips["fp32"], "bf16_img_s": ips["bf16"],
            "ratio": ips["bf16"] / ips["fp32"]}


def trained(data_root: str | None, max_train: int, epochs: int) -> list[dict]:
    """The same seeded ``fit`` of the fold CNN on PneumoniaMNIST in fp32 and with ``cpu_amp``."""
    from helpers import data as data_mod
    from helpers.data import TensorLoader
    from helpers.repro import seed_everything
    from helpers.train import fit

    ds = data_mod.subsample(data_mod.load("pneumoniamnist", 28, data_root), {"train": max_train}, seed=0)
    cfg = FitConfig(epochs=epochs, lr=2e-3, monitor="val/auc", progress="none")
    rows = []
    for mode in ("fp32", "bf16"):
        seed_everything(0)
        model = create_model("cnn", num_classes=2, in_chans=1, widths=[32, 64, 128])
        train = TensorLoader(ds["train"], 128, shuffle=True, seed=0)
        val = TensorLoader(ds["val"], 256)
        t = time.perf_counter()
        res = fit(model, train, val, ds.task, replace(cfg, cpu_amp=mode == "bf16"))
        best = res.history.loc[res.history["epoch"] == res.best_epoch].iloc[0]
        rows.append({"mode": mode, "seconds": time.perf_counter() - t, "best_epoch": res.best_epoch,
                     "val/loss": float(best["val/loss"]) if "val/loss" in best else float("nan"),
                     "val/acc": float(best["val/acc"]), "val/auc": float(best["val/auc"])})
    return rows


def main(argv=None) -> dict:
    """Run the benchmark; returns ``{"speed": [...], "fit": [...], "amx": bool}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=6, help="batches per round and model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--max-train", type=int, default=2000, help="PneumoniaMNIST training images for the fits")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--no-fit", action="store_true", help="speed only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amx = cpu_has_amx()
    print(f"device {device_name(torch.device('cpu'))}; AMX bf16: {'yes' if amx else 'no'}; load {loadavg()}; "
          f"{torch.get_num_threads()} torch threads; 28 px, channels_last")
    rows = []
    print(f"{'model':<12} {'batch':>5} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>10}")
    for name in args.models:
        r = speed(name, args.steps, args.rounds)
        rows.append(r)
        print(f"{name:<12} {r['batch']:>5} {r['fp32_img_s']:>11.0f} {r['bf16_img_s']:>11.0f} {r['ratio']:>10.2f}",
              flush=True)
    fits = []
    if not args.no_fit:
        fits = trained(args.data_root, args.max_train, args.epochs)
        print(f"\nthe fold CNN, {args.epochs} epochs on {args.max_train} PneumoniaMNIST images (seed 0), best epoch on val:")
        print(f"{'mode':<6} {'seconds':>8} {'best':>5} {'val/loss':>9} {'val/acc':>8} {'val/auc':>8}")
        for f in fits:
            print(f"{f['mode']:<6} {f['seconds']:>8.1f} {f['best_epoch']:>5} {f['val/loss']:>9.4f} {f['val/acc']:>8.4f} "
                  f"{f['val/auc']:>8.4f}")
    return {"speed": rows, "fit": fits, "amx": amx}


if __name__ == "__main__":
    main()
