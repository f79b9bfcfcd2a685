"""Noise-mask overhead: one training step of the classifier with and without the policy's masks.

Run from the repository root (about 20 s on 2 idle CPU cores with the defaults)::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/noise_overhead.py
    # the reference's policy backbone, on a GPU, at 224 px:
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/noise_overhead.py --policy-backbone timm/resnet10t \
        --hidden 512 --size 224 --grid 64 --kernel 13 --sigma 6 --model timm/resnet18 --device cuda

The same classifier (``--model``, AdamW) takes the same batches through the shared loop's pieces
(``transform_batch``, forward, per-sample loss, ``on_batch_end``, backward, step) in four settings:
plain (no hook), random masks (:class:`helpers.noise.RandomBetaMasks`), the REINFORCE policy and the
faithful coupled loss. It prints seconds per step and the ratio to the plain step; the target is
under 1.5x for the policy with the chapter's default (light) backbone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import device_name, loadavg, sync  # noqa: E402
from helpers.losses import make_criterion, reduce_loss  # noqa: E402
from helpers.models import create_model  # noqa: E402
from helpers.noise import FaithfulCriterion, MaskConfig, NoiseMaskHook, PolicyConfig, RandomBetaMasks  # noqa: E402
from helpers.noise.policy import policy_from_config  # noqa: E402
from helpers.repro import resolve_device  # noqa: E402


def main(argv=None) -> dict:
    """Run the benchmark; returns ``{"seconds_per_step": {...}, "ratio_to_plain": {...}}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--policy-backbone", default="cnn")
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    masks = MaskConfig(args.grid, args.kernel, args.sigma)
    pcfg = PolicyConfig(backbone=args.policy_backbone, widths=args.widths, hidden=args.hidden)

    def setting(name):
        clf = create_model(args.model, num_classes=args.classes, in_chans=3).to(dev)
        opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
        crit, hook = make_criterion("multi-class"), None
        if name == "random":
            hook = NoiseMaskHook(RandomBetaMasks(args.grid, 2.0, 2.0), masks, "random")
        elif name in ("policy", "faithful"):
            hook = NoiseMaskHook(policy_from_config(args.grid, 3, pcfg), masks,
                                 "reinforce" if name == "policy" else "faithful", pcfg)
            crit = FaithfulCriterion(hook) if name == "faithful" else crit
        if hook is not None:
            hook.on_fit_start(clf, opt, dev)

        def step():
            xx, yy = (x, y) if hook is None else hook.transform_batch(x, y, clf)
            logits = clf(xx)
            per = crit(logits.float(), yy)
            loss = reduce_loss(crit, per, yy)
            if hook is not None:
                hook.on_batch_end(xx, yy, logits.detach(), per.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    names = ["plain", "random", "policy", "faithful"]
    steps = {n: setting(n) for n in names}
    for n in names:   # warm-up
        for _ in range(3):
            steps[n]()
    total = dict.fromkeys(names, 0.0)
    for _ in range(args.rounds):   # interleaved, so drifting load hits every setting alike
        for n in names:
            sync(dev)
            t = time.perf_counter()
            for _ in range(args.steps):
                steps[n]()
            sync(dev)
            total[n] += time.perf_counter() - t
    per = {n: total[n] / (args.rounds * args.steps) for n in names}
    print(f"device {device_name(dev)}; load {loadavg()}; classifier {args.model}, policy {args.policy_backbone} "
          f"(hidden {args.hidden}); batch {args.batch} at {args.size} px, grid {args.grid}; "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'setting':<10} {'s/step':>9} {'x plain':>8}")
    for n in names:
        print(f"{n:<10} {per[n]:>9.4f} {per[n] / per['plain']:>8.2f}")
    return {"seconds_per_step": per, "ratio_to_plain": {n: per[n] / per["plain"] for n in names}}


if __name__ == "__main__":
    main()
