"""The cost of one APGA batch relative to one clean batch (and of every control), in the shared loop.

Each method trains the same classifier (``cnn``) on the same batches of real MedMNIST images with
``helpers.train.train_one_epoch``: ``clean`` is the loop alone (one update per batch); the others
add their hook from :mod:`helpers.apga.hooks` (a second update per batch, and for APGA
``agent_steps`` rounds of the agent's forward, erased forward and REINFORCE step; the faithful
variant takes the reference's one round, :data:`helpers.apga.protocol.REFERENCE_APGA`). Methods
run interleaved in ``--rounds`` blocks so that other jobs on a shared machine slow them alike.
Prints ms per batch and the ratio to clean. On a loaded machine, ``OMP_NUM_THREADS=1`` gives
steadier numbers (OpenMP threads that wait on each other slow the many small ops of the agent).

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/apga_step.py              # 28 px, unet_small
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/apga_step.py --size 64    # smp_unet (VGG11)
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/apga_step.py --size 64 --bf16   # as the full profile
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, loadavg, sync  # noqa: E402
from helpers import data as data_mod  # noqa: E402
from helpers.apga.hooks import APGAHook, CutoutHook, EndToEndHook, GradCAMHook, RepeatHook  # noqa: E402
from helpers.apga.masks import fill_value  # noqa: E402
from helpers.apga.protocol import REFERENCE_APGA  # noqa: E402
from helpers.losses import make_criterion  # noqa: E402
from helpers.models import create_model  # noqa: E402
from helpers.repro import resolve_device  # noqa: E402
from helpers.train import set_hook_precision, train_one_epoch  # noqa: E402

METHODS = ("clean", "repeat", "cutout", "gradcam", "end2end", "apga", "apga_faithful")


def make(method: str, task: str, agent_name: str, agent_kwargs: dict, baseline, agent_steps: int = 16):
    fill = fill_value()
    if method == "clean":
        return None
    if method == "repeat":
        return RepeatHook(task)
    if method == "cutout":
        return CutoutHook(task, fill)
    if method == "gradcam":
        return GradCAMHook(task, baseline, fill)
    agent = create_model(agent_name, 1, 1, **agent_kwargs)
    if method == "end2end":
        return EndToEndHook(task, agent, fill)
    if method == "apga_faithful":
        return APGAHook(task, agent, fill, faithful=True, **REFERENCE_APGA)
    return APGAHook(task, agent, fill, agent_steps=agent_steps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flag", default="breastmnist")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4, help="timed batches per method and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--agent-steps", type=int, default=16, help="agent updates per batch of the default APGA")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast of the loop and the hooks (the full profile's cpu_amp; amp on a GPU)")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    ds = data_mod.load(args.flag, args.size)
    train = ds["train"].take(torch.arange(args.batch_size * args.batches))
    agent_name, agent_kwargs = (("smp_unet", {"encoder": "vgg11"}) if args.size % 32 == 0
                                else ("unet_small", {"widths": (8, 16, 32)}))
    print(f"torch {torch.__version__}, python {platform.python_version()}, threads {torch.get_num_threads()}, "
          f"device {device_name(device)}, load {loadavg()}")
    print(f"{args.flag} {args.size} px, batch {args.batch_size}, {args.batches} batches x {args.rounds} rounds, "
          f"classifier cnn, agent {agent_name}, apga agent_steps {args.agent_steps}, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}")
    criterion = make_criterion(ds.task)
    baseline = create_model("cnn", ds.n_classes, ds.n_channels)
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds + 1):      # the first round warms up and is not counted
        for method in METHODS:
            torch.manual_seed(0)
            model = create_model("cnn", ds.n_classes, ds.n_channels).to(device)
            opt = torch.optim.AdamW(model.parameters(), 1e-4)
            hook = make(method, ds.task, agent_name, agent_kwargs, baseline, args.agent_steps)
            hooks = [hook] if hook is not None else []
            set_hook_precision(hooks, device, amp=args.bf16, cpu_amp=args.bf16)
            for h in hooks:
                h.on_fit_start(model, opt, device)
            loader = data_mod.TensorLoader(train, args.batch_size, shuffle=True, device=device, seed=0)
            sync(device)
            t0 = time.perf_counter()
            train_one_epoch(model, loader, criterion, opt, device=device, epoch=1, hooks=hooks, amp=args.bf16,
                            cpu_amp=args.bf16)
            sync(device)
            times[method].append((time.perf_counter() - t0) / args.batches * 1e3)
    clean = statistics.median(times["clean"][1:])
    print(f"\n{'method':<15}{'ms / batch':>12}{'x clean':>10}")
    for method in METHODS:
        ms = statistics.median(times[method][1:])
        print(f"{method:<15}{ms:>12.1f}{ms / clean:>10.2f}", flush=True)
    print(f"\nload at the end {loadavg()}")


if __name__ == "__main__":
    main()
