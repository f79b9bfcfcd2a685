"""Worker of tests/test_ddp.py, started by ``torch.distributed.run`` with 2 processes.

Each rank trains the same model for 2 epochs on its shard of a synthetic separable problem
through ``helpers.train.fit`` (DistributedDataParallel over gloo) and writes a JSON report
(``rank<k>.json`` in the folder given as argv[1]) with checksums of its final parameters and
buffers, its history and its shard's sample ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from helpers.data import Split, TensorLoader  # noqa: E402
from helpers.models import create_model  # noqa: E402
from helpers.repro import seed_everything  # noqa: E402
from helpers.train import FitConfig, fit, init_distributed, is_main_process  # noqa: E402


def separable(n: int, seed: int, size: int = 8) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2)[torch.randperm(n, generator=g)]
    low = torch.randint(0, 110, (n, 1, size, size), generator=g)
    high = torch.randint(145, 256, (n, 1, size, size), generator=g)
    return Split(torch.where(labels.view(-1, 1, 1, 1).bool(), high, low).to(torch.uint8), labels)


def checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank, world = init_distributed("gloo")
    assert world == 2 and dist.is_initialized(), (rank, world)
    # a different seed per rank: DDP must still start every rank from rank 0's weights
    seed_everything(100 + rank)
    model = create_model("cnn", num_classes=2, in_chans=1, widths=(8, 16))
    train, val = separable(160, 0), separable(64, 1)
    loader = TensorLoader(train, 16, shuffle=True, seed=0, rank=rank, world_size=world)
    val_loader = TensorLoader(val, 64)  # every rank scores the same full val split
    ids = torch.cat(list(_shard_ids(train, rank, world))).tolist()
    cfg = FitConfig(epochs=2, lr=1e-2, schedule="cosine", monitor="val/acc", progress="none")
    res = fit(model, loader, val_loader, "binary-class", cfg)
    state = res.model.state_dict()
    params = {k: v for k, v in res.model.named_parameters()}
    buffers = {k: v for k, v in state.items() if k not in params}
    report = {"rank": rank, "world": world, "main": is_main_process(),
              "params": checksum(params), "buffers": checksum(buffers),
              "loss": res.history["train/loss"].tolist(), "val_acc": res.history["val/acc"].tolist(),
              "best_epoch": res.best_epoch, "ids": ids}
    report["unit"] = whole_unit(out_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    dist.barrier()
    dist.destroy_process_group()


def whole_unit(out_dir: str) -> dict:
    """A whole supervised unit under DDP: every rank trains its shard, rank 0 evaluates and stores."""
    from helpers.data import MedMNIST
    from helpers.experiment import train_and_test
    from helpers.results import Recorder

    splits = {"train": separable(160, 0), "val": separable(64, 1), "test": separable(64, 2)}
    ds = MedMNIST("synthetic", 8, "binary-class", 1, {"0": "dark", "1": "bright"}, splits)
    recorder = Recorder(os.path.join(out_dir, "results"))
    cfg = FitConfig(epochs=2, lr=1e-2, schedule="cosine", monitor="val/acc", progress="none")
    metrics = train_and_test(recorder, ds, "cnn", 0, cfg, batch_size=16, model_kwargs={"widths": [8, 16]})
    return {"metrics": metrics, "units": len(recorder.units())}


def _shard_ids(split: Split, rank: int, world: int):
    """The official positions a rank's loader visits in its first epoch (same seed as training)."""
    tagged = Split(torch.arange(len(split)).view(-1, 1, 1, 1).to(torch.uint8), split.labels)
    for x, _ in TensorLoader(tagged, 16, shuffle=True, seed=0, rank=rank, world_size=world, mean=0.0, std=1.0):
        yield torch.round(x.flatten() * 255).long()


if __name__ == "__main__":
    main(sys.argv[1])
