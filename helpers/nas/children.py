"""Train NAS children and score them on validation: :func:`train_children`, two engines, one result.

Children (:class:`helpers.models.NASChild`) train with Adam and cross-entropy, no augmentation,
images normalised as ``(x / 255 - 0.5) / 0.5``, ``drop_last`` batches; the score is validation
accuracy. ``engine="plain"`` is a straightforward PyTorch loop, one child at a time (the reference);
``engine="fast"`` (:mod:`helpers.nas.fast`) trains the same children faster on CPU with C kernels
and equals the plain engine within float rounding (fp32; its convolution sums in another order).

Determinism contract: a child's result depends only on ``seeds[i]`` (its initial weights, drawn
from a per-child ``torch.Generator``, and its dropout masks, from its :class:`DropoutStream`),
``data_seed`` (epoch ``e`` uses the ``e``-th ``randperm`` of ``Generator(data_seed)``; the same for
every child of a call), the training settings and the data: never on the engine, the other
children of the call, the thread count or the global RNG. ``precision="bf16"`` (autocast) changes
the numbers. On CPU the numbers repeat exactly; on a GPU they do not (cuDNN's convolution
algorithms and atomic additions sum in varying order), so a GPU rerun differs in the last digits
and, through the search, in which children are picked. Design history and measurements:
``benchmarks/README.md``.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.nas_child import NASChild, child_flops, child_params, normalize_arch
from .cache import ChildCache
from .child_data import ChildData, autocast, normalise
from .dropout import DropoutStream
from .fast import engine as fast_engine
from .fast import kernels as kernels_mod
from .fast.runtime import reuse_large_allocations, torch_threads

__all__ = ["ENGINES", "PRECISIONS", "train_children", "train_plain"]

ENGINES = ("plain", "fast")
PRECISIONS = ("fp32", "bf16")


def train_plain(arch, seed, data: ChildData, cfg: dict) -> dict:
    """One child, the straightforward way."""
    device = data.device
    model = NASChild(arch, cfg["in_chans"], cfg["num_classes"], cfg["image_size"], seed=seed).to(device)
    model.set_dropout_stream(DropoutStream(seed))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    bs = cfg["batch_size"]
    steps = data.n_train // bs
    epoch_losses = []
    model.train()
    t0 = time.perf_counter()
    for order in data.epoch_orders(cfg["data_seed"], cfg["epochs"]):
        total = 0.0
        for s in range(steps):
            idx = order[s * bs:(s + 1) * bs]
            x = normalise(data.train_images[idx]).to(device)
            y = data.train_labels[idx.to(device)]
            with autocast(cfg["precision"], device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        epoch_losses.append(total / max(steps, 1))
    t1 = time.perf_counter()
    model.eval()
    correct = 0
    with torch.no_grad(), autocast(cfg["precision"], device):
        for start in range(0, data.n_val, bs):
            x = normalise(data.val_images[start:start + bs]).to(device)
            correct += int((model(x).argmax(1) == data.val_labels[start:start + bs]).sum())
    return {"val_acc": correct / data.n_val, "val_correct": correct, "epoch_losses": epoch_losses,
            "fit_s": t1 - t0, "eval_s": time.perf_counter() - t1, "engine_path": "plain"}


def train_children(archs: Sequence, train_split, val_split, *, num_classes: int, seeds: Sequence[int],
                   epochs: int = 5, batch_size: int = 128, lr: float = 1e-3, data_seed: int = 0,
                   device: str | torch.device = "cpu", engine: str = "fast", precision: str = "fp32",
                   max_train: int | None = None, in_chans: int | None = None, image_size: int | None = None,
                   cache: ChildCache | None = None, workers: int | None = None) -> list[dict]:
    """Train each child of ``archs`` on ``train_split`` and score it on ``val_split``.

    Args:
        archs: architectures (lists of layer dicts; see :func:`normalize_arch`).
        train_split, val_split: :class:`helpers.data.Split` (uint8 images (N, C, H, W), int64 labels).
        num_classes: logits of the head.
        seeds: one per child; seeds its initial weights and its dropout masks.
        data_seed: the order of the training images in each epoch, the same for every child here.
        engine: ``"plain"`` (reference loop) or ``"fast"`` (see :mod:`helpers.nas.fast`).
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        max_train: use only the first ``max_train`` training images.
        in_chans, image_size: default to the images' channels and side.
        cache: a :class:`ChildCache`; children found there are not trained (``cached: True``).
        workers: fast engine on CPU with its kernels: how many children train at once, each on
            one thread (default: 2 when there are two or more children and torch may use two
            threads; 1 trains one child at a time, its kernels split over two threads). Results
            do not depend on it.

    Returns:
        One dict per child: ``val_acc``, ``params``, ``train_s`` (its share of the wall time: its own
        training and scoring plus an equal share of the data preparation), ``final_train_loss`` (mean
        training loss over the last epoch's steps), ``epoch_losses``, ``val_correct``, ``n_val``,
        ``n_train``, ``arch``, ``seed``, ``data_seed``, ``engine``, ``precision``, ``cached``, and what
        measured it: ``engine_path`` (``plain``, ``fast: C kernels, fused step``, ``fast: C kernels,
        first layer`` or ``fast: PyTorch ops (fallback)``) and ``kernels_loaded`` (whether the C
        kernels loaded; None where they do not apply: plain engine, GPU, bf16).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    archs = [normalize_arch(a) for a in archs]
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(archs):
        raise ValueError(f"need one seed per arch: {len(archs)} archs, {len(seeds)} seeds")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    device = torch.device(device)
    c, h = train_split.images.shape[1], train_split.images.shape[2]
    in_chans = c if in_chans is None else in_chans
    image_size = h if image_size is None else image_size
    if (in_chans, image_size) != (c, h):
        raise ValueError(f"images are {c}x{h}x{h} but in_chans={in_chans}, image_size={image_size}")
    n_train = len(train_split) if max_train is None else min(int(max_train), len(train_split))
    if n_train < batch_size:
        raise ValueError(f"{n_train} training images do not fill one batch of {batch_size} (drop_last)")
    cfg = {"num_classes": int(num_classes), "in_chans": int(in_chans), "image_size": int(image_size),
           "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "data_seed": int(data_seed),
           "precision": precision, "max_train": max_train}

    results: list[dict | None] = [None] * len(archs)
    keys = [None] * len(archs)
    if cache is not None:
        settings = dict(cfg, n_train=n_train, data=cache.data_fingerprint(train_split, val_split, n_train))
        for i, (arch, seed) in enumerate(zip(archs, seeds)):
            keys[i] = cache.key(arch, seed, settings)
            hit = cache.get(keys[i])
            if hit is not None:
                results[i] = dict(hit, cached=True)
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        t0 = time.perf_counter()
        data = ChildData.get(train_split, val_split, max_train, device) if engine == "fast" else \
            ChildData(train_split, val_split, max_train, device)
        tried = engine == "fast" and device.type == "cpu" and precision == "fp32"   # where the kernels apply
        kernels = kernels_mod.get_kernels() if tried else None
        kernels_loaded = (kernels is not None) if tried else None
        threads = torch.get_num_threads()
        # Two children at once (one thread each) or one child split over two threads.
        n_workers = 1
        if kernels is not None and threads > 1:
            n_workers = min(2, len(todo)) if workers is None else max(1, min(int(workers), threads, len(todo)))
            kernels = kernels.with_threads(1 if n_workers > 1 else min(threads, 2))
        with reuse_large_allocations(engine == "fast" and device.type == "cpu"), \
                torch_threads(1 if kernels is not None else threads):
            if engine == "fast":   # shared preparation, timed apart and shared out equally
                data.normalised("train"), data.normalised("val")
                if kernels is not None:
                    for r in sorted({archs[i][0]["kernel"] // 2 for i in todo}):
                        data.padded("train", r), data.padded("val", r)
            prep_s = time.perf_counter() - t0

            def run(i):
                t1 = time.perf_counter()
                if engine == "plain":
                    out = train_plain(archs[i], seeds[i], data, cfg)
                else:
                    out = fast_engine.train_fast(archs[i], seeds[i], data, cfg, kernels)
                out["own_s"] = time.perf_counter() - t1
                return i, out

            t_run = time.perf_counter()
            if n_workers > 1:   # largest first, so the two workers finish close together
                todo = sorted(todo, key=lambda i: -child_flops(archs[i], in_chans, num_classes, image_size)["train"])
                with ThreadPoolExecutor(n_workers, thread_name_prefix="nas_child") as pool:
                    done = list(pool.map(run, todo))
            else:
                done = [run(i) for i in todo]
            wall = time.perf_counter() - t_run
            own_total = sum(out["own_s"] for _, out in done) or 1.0
            for i, out in done:
                out.update(
                    params=child_params(archs[i], in_chans, num_classes, image_size),
                    train_s=wall * out["own_s"] / own_total + prep_s / len(todo), prep_s=prep_s / len(todo),
                    final_train_loss=out["epoch_losses"][-1], n_val=data.n_val, n_train=data.n_train,
                    arch=archs[i], seed=seeds[i], data_seed=int(data_seed), engine=engine,
                    precision=precision, workers=n_workers, kernels_loaded=kernels_loaded, cached=False)
                results[i] = out
                if cache is not None:
                    cache.put(keys[i], out)
    return results
