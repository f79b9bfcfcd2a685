"""Data-pipeline benchmark: medmnist + torchvision + DataLoader vs helpers.data + helpers.augment.

Run from the repository root (about 30 s on 2 idle CPU cores with the defaults)::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/data_pipeline.py

    # also with 2 DataLoader workers, more steps, numbers to JSON:
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/data_pipeline.py \
        --workers 0 2 --steps 300 --json /tmp/data_pipeline.json

Both pipelines train the SAME model (``helpers.models.create_model(--model, num_classes, in_chans)``,
same seed, so the same initial weights) with the SAME augmentation for the SAME number of
optimizer steps (AdamW, lr 1e-3, weight decay 1e-4 as in ``helpers.train.FitConfig``, batch 128)
on the train split of OrganAMNIST (28 px):

(a) **medmnist** -- the way a medmnist user would write it::

        medmnist.OrganAMNIST(split="train", root=ROOT, download=False, transform=T.Compose([
            T.RandomHorizontalFlip(), T.RandomAffine(degrees=10, translate=(0.05, 0.05)),
            T.ToTensor(), T.Normalize(0.5, 0.5)]))
        torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=W)

    one PIL image at a time, model in the default (NCHW) memory format.

(b) **helpers** -- the way ``helpers.train.fit`` is fed::

        ds = helpers.data.load("organamnist", root=ROOT)
        aug = helpers.augment.make_augment({"hflip": 0.5, "rotate": 10, "translate": 0.05})
        helpers.data.TensorLoader(ds["train"], 128, shuffle=True, augment=aug, device=DEVICE)

    uint8 tensors in memory, one batched affine_grid/grid_sample per batch, model and inputs in
    channels_last as ``fit`` does (``FitConfig.channels_last`` defaults to True).

The two augmentations draw from the same distribution (flip p=0.5, rotation uniform in +-10 deg,
shift uniform in +-5 % of the side, zero fill); torchvision's RandomAffine resamples PIL images
with nearest-neighbour interpolation, helpers with bilinear.

Every step is timed in two parts: *data* = getting the next batch onto the device (loading,
augmentation, normalisation, collation, label conversion, memory-format change: everything
outside the model) and *model* = forward, loss, backward, optimizer step (with ``loss.item()``,
as ``helpers.train.train_one_epoch`` does, and a CUDA synchronize on GPU). With ``--workers > 0``
the DataLoader prepares batches in worker processes while the model runs, so *data* is only the
time the training loop waits for them.

The pipelines run interleaved (``--rounds``, default 10): each round runs a block of ``steps/rounds``
timed steps of every pipeline in turn, the order rotating, so that other jobs on a shared machine
slow all pipelines alike. ``--warmup`` untimed steps open each pipeline's first block; every later
block opens with ``2 * max(workers) + 1`` untimed steps that use up the batches DataLoader
workers prefetched while another pipeline ran. Every pipeline thus makes the same number of
optimizer steps, timed and in all. ``--rounds 1`` runs them one after another.

Printed: a header (torch/torchvision/medmnist versions, torch threads, CPU count, device, load
average), the one-off load time of each pipeline, and a table with, per pipeline: images/s,
mean step ms, mean data ms, mean model ms, the share of step time outside the model (%), and the
CPU time this process got per wall second (well below ``100 * threads`` means other jobs took
the CPU), and the mean training loss of the last 20 steps (a sanity check that both trained
alike); then the ratio
helpers images/s / medmnist images/s. ``--json PATH`` writes the same numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing helpers
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.common import loadavg, sync  # noqa: E402
from helpers.repro import resolve_device  # noqa: E402

BATCH = 128
LR = 1e-3
WEIGHT_DECAY = 1e-4  # helpers.train.FitConfig.weight_decay
AUG_SPEC = {"hflip": 0.5, "rotate": 10, "translate": 0.05}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None,
                   help="folder holding organamnist.npz (default: helpers.config.data_root(), i.e. $RLMED_DATA "
                        "or its default)")
    p.add_argument("--flag", default="organamnist", help="MedMNIST 2D flag (default organamnist)")
    p.add_argument("--model", default="cnn", help="helpers.models name (default cnn)")
    p.add_argument("--steps", type=int, default=150, help="timed optimizer steps per pipeline (default 150)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing (default 5)")
    p.add_argument("--rounds", type=int, default=10,
                   help="interleave the pipelines in this many blocks of steps (default 10; 1 = one after another)")
    p.add_argument("--workers", type=int, nargs="+", default=[0],
                   help="DataLoader num_workers for (a); several values give one row each (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--medmnist-channels-last", action="store_true",
                   help="also put (a)'s model in channels_last, to isolate the data pipeline")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (fit's amp=True default)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    return p.parse_args(argv)


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ---- the two pipelines -----------------------------------------------------------------------
def medmnist_dataset(flag: str, root: str):
    import medmnist
    import torchvision.transforms as T

    cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    transform = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomAffine(degrees=10, translate=(0.05, 0.05)),
        T.ToTensor(),
        T.Normalize(mean=[0.5], std=[0.5]),
    ])
    return cls(split="train", root=root, download=False, transform=transform)


def medmnist_batches(ds, workers: int, seed: int, device: torch.device, multilabel: bool, channels_last: bool):
    """Endless batches from a torch DataLoader over the medmnist dataset (re-iterates per epoch)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    while True:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.float() if multilabel else y.reshape(-1).long()
            yield x, y.to(device, non_blocking=True)


def helpers_batches(split, aug, seed: int, device: torch.device, channels_last: bool):
    """Endless batches from helpers.data.TensorLoader, converted as helpers.train.train_one_epoch does."""
    from helpers.data import TensorLoader

    loader = TensorLoader(split, BATCH, shuffle=True, augment=aug, device=device, seed=seed)
    while True:
        for x, y in loader:
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


# ---- the shared training step ----------------------------------------------------------------
class Trainer:
    """One pipeline's model, optimizer and batch stream; :meth:`step` runs and times one step."""

    def __init__(self, name: str, batches, args, device: torch.device, n_classes: int, in_chans: int,
                 task: str, channels_last: bool):
        from helpers.models import create_model
        from helpers.train import make_criterion, reduce_loss

        self.name, self.batches, self.device, self.channels_last = name, batches, device, channels_last
        torch.manual_seed(args.seed)  # same initial weights for every pipeline
        model = create_model(args.model, num_classes=n_classes, in_chans=in_chans).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.crit = make_criterion(task)
        self.reduce = reduce_loss  # per-sample losses and their reduction, as train_one_epoch
        self.amp = device.type == "cuda" and not args.no_amp
        self.data_s, self.model_s, self.losses = [], [], []
        self.wall_s, self.cpu_s, self.images, self.untimed = 0.0, 0.0, 0, 0

    def step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (data seconds, model seconds, images)."""
        t0 = time.perf_counter()
        x, y = next(self.batches)
        sync(self.device)
        t1 = time.perf_counter()
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x)
            loss = self.reduce(self.crit, self.crit(logits.float(), y), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())  # a host sync, as train_one_epoch does
        sync(self.device)
        return t1 - t0, time.perf_counter() - t1, len(y)

    def run(self, timed_steps: int, untimed_steps: int) -> None:
        """``untimed_steps`` (warm-up, or draining batches workers prefetched while another pipeline
        ran), then ``timed_steps`` timed ones."""
        for _ in range(untimed_steps):
            self.step()
        self.untimed += untimed_steps
        sync(self.device)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(timed_steps):
            d, m, n = self.step()
            self.data_s.append(d)
            self.model_s.append(m)
            self.images += n
        self.wall_s += time.perf_counter() - wall0
        self.cpu_s += time.process_time() - cpu0

    def summary(self) -> dict:
        data_ms = 1e3 * sum(self.data_s) / len(self.data_s)
        model_ms = 1e3 * sum(self.model_s) / len(self.model_s)
        return {
            "pipeline": self.name,
            "channels_last": self.channels_last,
            "timed_steps": len(self.data_s),
            "untimed_steps": self.untimed,
            "images": self.images,
            "wall_s": self.wall_s,
            "images_per_s": self.images / self.wall_s,
            "process_cpu_pct": 100 * self.cpu_s / self.wall_s,
            "step_ms": data_ms + model_ms,
            "data_ms": data_ms,
            "model_ms": model_ms,
            "data_median_ms": 1e3 * statistics.median(self.data_s),
            "model_median_ms": 1e3 * statistics.median(self.model_s),
            "outside_model_pct": 100 * data_ms / (data_ms + model_ms),
            "loss_last20": float(np.mean(self.losses[-20:])),
        }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import medmnist
    import torchvision

    import helpers.data as hdata
    from helpers.augment import make_augment

    device = resolve_device(args.device)
    from helpers.config import data_root

    root = str(data_root(args.data_root))
    meta = hdata.info(args.flag)
    n_classes, in_chans, task = len(meta["label"]), meta["n_channels"], meta["task"]
    env = {
        "torch": torch.__version__, "torchvision": torchvision.__version__, "medmnist": medmnist.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "loadavg_start": loadavg(),
    }
    print(f"torch {env['torch']}  torchvision {env['torchvision']}  medmnist {env['medmnist']}  "
          f"python {env['python']}")
    print(f"threads {env['threads']}  cpus {env['cpus']}  device {env['device']}  loadavg {env['loadavg_start']}")
    print(f"{args.flag} train, model {args.model} ({n_classes} classes, {in_chans} ch), batch {BATCH}, "
          f"AdamW lr {LR:g} wd {WEIGHT_DECAY:g}, seed {args.seed}, augment {AUG_SPEC}")
    rounds = max(1, min(args.rounds, args.steps))
    resume = 2 * max(args.workers) + 1 if rounds > 1 else 0
    print(f"{args.steps} timed steps per pipeline in {rounds} interleaved round(s), after {args.warmup} "
          f"warm-up steps (+{resume} untimed per later round); "
          f"{args.warmup + args.steps + (rounds - 1) * resume} optimizer steps each in all")

    # -- one-off load times (file read once first, so both find it in the OS page cache) --------
    path = hdata.locate(args.flag, 28, root, download=False, verify=False)
    path.read_bytes()

    def helpers_load_verified():
        getattr(hdata, "_MD5_CACHE", {}).clear()  # time the MD5 check every time, as in a fresh process
        return hdata.load(args.flag, root=root, download=False)

    t_mm, mm_ds = timed(lambda: medmnist_dataset(args.flag, root))
    t_h_train, _ = timed(lambda: hdata.load(args.flag, root=root, download=False, verify=False, splits=("train",)))
    t_h, ds = timed(helpers_load_verified)
    loads = {
        "medmnist_dataset_train_s": t_mm,
        "helpers_load_train_noverify_s": t_h_train,
        "helpers_load_all_splits_md5_s": t_h,
    }
    print("\none-off load (median of 3):")
    for label, t in ((f"medmnist.{type(mm_ds).__name__}(split='train', download=False)", t_mm),
                     ("helpers.data.load(flag, root)  [3 splits + MD5 check]", t_h),
                     ("helpers.data.load(..., verify=False, splits=('train',))", t_h_train)):
        print(f"  {label:<58} {t * 1e3:8.1f} ms")

    # -- training runs ------------------------------------------------------------------------
    multilabel = task.startswith("multi-label")
    trainers, gens = [], []
    for w in args.workers:
        gens.append(medmnist_batches(mm_ds, w, args.seed, device, multilabel, args.medmnist_channels_last))
        trainers.append(Trainer(f"medmnist w={w}", gens[-1], args, device, n_classes, in_chans, task,
                                args.medmnist_channels_last))
    aug = make_augment(AUG_SPEC)
    trainers.append(Trainer("helpers", helpers_batches(ds["train"], aug, args.seed, device, True),
                            args, device, n_classes, in_chans, task, True))
    # Interleave: each round runs a block of steps of every pipeline in turn (order rotating), so
    # a background load on a shared machine hits all pipelines alike. Each block starts with
    # `resume` untimed steps that use up what DataLoader workers prefetched (2 per worker) meanwhile.
    for r in range(rounds):
        block = args.steps // rounds + (1 if r < args.steps % rounds else 0)
        shift = r % len(trainers)
        for t in trainers[shift:] + trainers[:shift]:
            t.run(block, args.warmup if r == 0 else resume)
    for g in gens:
        g.close()  # shuts DataLoader workers down
    runs = [t.summary() for t in trainers]
    print(f"\n{'pipeline':<14} {'images/s':>9} {'step ms':>8} {'data ms':>8} {'model ms':>9} "
          f"{'outside model':>14} {'cpu %':>6} {'loss(last20)':>13}")
    for r in runs:
        print(f"{r['pipeline'] + (' (cl)' if r['channels_last'] else ''):<14} {r['images_per_s']:9.0f} "
              f"{r['step_ms']:8.2f} {r['data_ms']:8.2f} {r['model_ms']:9.2f} {r['outside_model_pct']:13.1f}% "
              f"{r['process_cpu_pct']:6.0f} {r['loss_last20']:13.3f}")
    helpers_ips = runs[-1]["images_per_s"]
    ratios = {}
    for r in runs[:-1]:
        ratios[r["pipeline"]] = helpers_ips / r["images_per_s"]
        print(f"ratio helpers / {r['pipeline']} images/s: {ratios[r['pipeline']]:.2f}x")
    print("(cl) = model and inputs in channels_last; data = everything outside the model step; cpu % = CPU "
          f"time of this process (not of DataLoader workers) per wall second, at most {100 * env['threads']}")
    env["loadavg_end"] = loadavg()
    print(f"loadavg at end {env['loadavg_end']} (includes this benchmark)")
    busy = float(env["loadavg_start"].split()[0]) if env["loadavg_start"] != "n/a" else 0.0
    if busy > 0.5 * (os.cpu_count() or 1):  # measured before this benchmark's own work
        print(f"note: 1-min load average {busy:.2f} on {os.cpu_count()} CPUs at start (other jobs, or a run "
              f"just before): timings may be slower and noisier than on an idle machine; see cpu %")

    result = {"env": env, "config": {**{k: v for k, v in vars(args).items() if k != "json"},
                                     "data_root": root, "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY,
                                     "augment": AUG_SPEC},
              "load": loads, "runs": runs, "ratio_helpers_over_medmnist": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
