"""The ensemble chapter's augmentation: albumentations per image vs the batched tensor path.

Run from the repository root (about 20 s on 2 idle CPU cores with the defaults)::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ensemble_augment.py
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ensemble_augment.py --sizes 28 64 --images 1024 --json /tmp/aug.json
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ensemble_augment.py --threads 1   # as the chapter trains

Both implementations augment the SAME images (PneumoniaMNIST train, the first ``--images``; BreastMNIST
for 64 px, the only other size in the shared data folder; other sizes are the 28 px images resized)
with the reference's augmentation (helpers/ensemble/augment.py):

(a) **albumentations**: ``reference_pipeline(size)``, one uint8 image at a time (RandomResizedCrop,
    flips, Rotate, Affine with shear, OneOf(brightness-contrast, Gaussian blur, equalize), Erasing);
(b) **tensor**: ``helpers.augment.BatchAugment(TENSOR_SPEC)`` then ``ReferenceColour`` per batch of
    ``--batch-size`` float images, every image its own draw, one fused grid_sample (no shear), then
    OneOf(jitter, 3x3 blur, equalize) and erasing, batched.

Printed per size: images/s of both and the ratio tensor / albumentations (best of ``--repeats``).
Nothing is asserted: this is a measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import loadavg  # noqa: E402
from helpers import data as data_mod  # noqa: E402
from helpers.ensemble.augment import throughput  # noqa: E402


def images_at(size: int, n: int) -> tuple[torch.Tensor, str]:
    """``n`` uint8 images at ``size`` px and where they come from."""
    if size == 28:
        return data_mod.load("pneumoniamnist")["train"].images[:n], "pneumoniamnist (28 px)"
    try:
        return data_mod.load("breastmnist", size)["train"].images[:n], f"breastmnist ({size} px)"
    except data_mod.DataError:
        x = data_mod.load("pneumoniamnist")["train"].images[:n].float()
        up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return up.round().clamp(0, 255).to(torch.uint8), f"pneumoniamnist resized 28 -> {size} px"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 160])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import albumentations

    print(f"torch {torch.__version__}, albumentations {albumentations.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {loadavg()}")
    print(f"{'size':>5} {'images':>7} {'tensor img/s':>13} {'albumentations img/s':>21} {'ratio':>6}  source")
    rows = []
    for size in args.sizes:
        x, source = images_at(size, args.images)
        r = throughput(x, args.batch_size, args.repeats) | {"source": source}
        rows.append(r)
        print(f"{size:>5} {r['images']:>7} {r['tensor_img_s']:>13,.0f} {r['albumentations_img_s']:>21,.0f} "
              f"{r['ratio']:>5.1f}x  {source}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
