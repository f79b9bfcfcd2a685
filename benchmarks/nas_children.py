"""NAS child-training benchmark: ``helpers.nas`` plain engine vs fast engine on real OrganAMNIST.

Run from the repository root (about 3 minutes on 2 idle CPU cores with the defaults, 4 with
``--bf16``; much longer when other jobs load the machine, which slows the plain engine most)::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/nas_children.py

    # shorter / longer, numbers to JSON, plus the bf16 ranking check:
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/nas_children.py \\
        --children 12 --epochs 1 --max-train 19200 --bf16 --json /tmp/nas_children.json

    # measure the protocol directly: each of the 24 architectures once, 5 epochs, full train (~2 min)
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/nas_children.py --protocol-check

    # on a GPU (target: the protocol in under 3 minutes)
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/nas_children.py --device cuda --protocol-check

``--children`` architectures (default 12) are drawn uniformly with ``--seed`` from the RLMedNAS space
(filters {16, 32, 64, 128} x kernel {3, 5} x dropout {0.1, 0.25, 0.5}, one layer); child ``i`` gets
init seed ``1000 + i`` and all children share the data order of ``--data-seed``. Every child is
trained for ``--epochs`` on the first ``--max-train`` training images (Adam 1e-3, batch 128,
drop_last) and scored on the whole validation split (6,491 images), by:

* **plain** -- ``train_children(engine="plain")``, one child per call: the reference loop
  (PyTorch with its default threads);
* **fast 1/call** -- ``train_children(engine="fast")``, one child per call (what a search that
  updates its controller after every child does): each child's kernels split over two threads;
* **fast batch** -- ``train_children(engine="fast")`` on all children in one call: two children at
  a time, one thread each.

Plain and fast 1/call alternate child by child, so load from other jobs hits both alike. Printed:
a header (versions, threads, load average), one row per child (params, val accuracy of each engine,
ms per training step of each), then per engine: children per minute at these settings, the
projected wall time of the full protocol (300 children x 5 epochs x the full 34,561-image train
split; see ``engine_summary``: each child's measured time per step scaled to 1,350 steps plus its
scoring and overheads, averaged over the sampled children -- "sample" -- and, less noisy, from a
least-squares fit of time on FLOPs averaged over all 24 architectures of the space -- "space fit"),
the achieved GFLOP/s (analytic conv + linear FLOPs, forward and backward, training and scoring;
see ``helpers.nas.child_flops``) beside torch fp32 and bf16 matmul GFLOP/s measured here,
the fast/plain speed ratio, the largest |val_acc difference| between the engines and the Spearman
correlation of their val accuracies. ``--bf16`` also trains the children with the plain engine
under bf16 autocast and reports the Spearman correlation of their val accuracies with fp32.
``--protocol-check`` instead trains each of the 24 architectures once, 5 epochs on the full train
split, one child per call, and reports the measured mean time per child times 300.
``--json PATH`` writes everything as JSON.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing helpers
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import device_name, loadavg, sync  # noqa: E402
from helpers import nas as ne  # noqa: E402
from helpers.data import load  # noqa: E402
from helpers.repro import resolve_device  # noqa: E402

SPACE = {"filters": [16, 32, 64, 128], "kernel": [3, 5], "dropout": [0.1, 0.25, 0.5]}
PROTOCOL_CHILDREN, PROTOCOL_EPOCHS, PROTOCOL_TARGET_MIN, PROTOCOL_TARGET_GPU_MIN = 300, 5, 40.0, 3.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None,
                   help="folder holding organamnist.npz (default: helpers.config.data_root(), i.e. $RLMED_DATA "
                        "or its default)")
    p.add_argument("--children", type=int, default=12, help="children per engine (default 12)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per child (default 1)")
    p.add_argument("--max-train", type=int, default=19200,
                   help="first N training images (default 19200 = 150 steps; 0 = all 34,561)")
    p.add_argument("--seed", type=int, default=0, help="seed of the architecture sample (default 0)")
    p.add_argument("--data-seed", type=int, default=0, help="data order of every child (default 0)")
    p.add_argument("--bf16", action="store_true", help="also plain bf16 autocast: ranking check vs fp32")
    p.add_argument("--skip-batch", action="store_true", help="skip the 'fast batch' run")
    p.add_argument("--protocol-check", action="store_true",
                   help="only: train each of the 24 architectures once with the fast engine, one per call, "
                        "5 epochs on the full train split, and report the measured protocol time")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, or auto (CUDA when available); the protocol target is "
                        f"{PROTOCOL_TARGET_MIN:.0f} min on 2 CPU cores and {PROTOCOL_TARGET_GPU_MIN:.0f} min on one GPU")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    return p.parse_args(argv)


def sample_archs(n: int, seed: int) -> list[list[dict]]:
    space = list(itertools.product(*SPACE.values()))
    rng = np.random.default_rng(seed)
    return [[dict(zip(SPACE, space[i]))] for i in rng.integers(len(space), size=n)]


def matmul_size(device: torch.device) -> int:
    """Side of the square matmul that measures the device's peak (large enough to fill a GPU)."""
    return 8192 if device.type == "cuda" else 2048


def matmul_gflops(dtype: torch.dtype, device: torch.device = torch.device("cpu"), repeats: int = 5) -> float:
    n = matmul_size(device)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def child_flops_total(res: dict, epochs: int, steps: int, batch: int) -> float:
    f = ne.child_flops(res["arch"])
    return f["train"] * steps * batch * epochs + f["fwd"] * res["n_val"]


def engine_summary(name: str, results: list[dict], wall_s: float, epochs: int, batch: int, n_full: int,
                   n_val: int) -> dict:
    """Speed of one engine and its projection to the full protocol.

    A child's share of the wall time is ``train_s`` (its training and scoring, divided among the
    children that ran at once, plus its share of the data preparation ``prep_s``). Projected per
    child: ``k * (fit_s / steps * full_steps + eval_s + other) + prep_s * full_images / images``,
    where ``k = (train_s - prep_s) / own_s`` is 1 for one child at a time and ~1/2 for two at once.
    """
    n_train = results[0]["n_train"]
    steps = n_train // batch
    full_steps = (n_full // batch) * PROTOCOL_EPOCHS
    k = np.array([(r["train_s"] - r["prep_s"]) / r["own_s"] for r in results])
    fit = np.array([r["fit_s"] for r in results])
    ev = np.array([r["eval_s"] for r in results])
    other = np.array([r["own_s"] - r["fit_s"] - r["eval_s"] for r in results])
    prep = np.array([r["prep_s"] for r in results]) * (n_full + n_val) / (n_train + n_val)
    per_step = fit / (steps * epochs)
    proto_child = k * (per_step * full_steps + ev + other) + prep
    outside = wall_s / sum(r["train_s"] for r in results)       # calls' own overhead, >= 1
    # least squares on this sample: step time = a + b * FLOPs per step; then averaged over the space
    fl = np.array([ne.child_flops(r["arch"])["train"] * batch for r in results])
    A = np.stack([np.ones_like(fl), fl], 1)
    a, b = np.linalg.lstsq(A, k * per_step, rcond=None)[0]
    ea, eb = np.linalg.lstsq(A, k * (ev + other) + prep, rcond=None)[0]
    space_fl = np.array([ne.child_flops([dict(zip(SPACE, c))])["train"] * batch
                         for c in itertools.product(*SPACE.values())])
    space_child = (a + b * space_fl) * full_steps + (ea + eb * space_fl)
    flops = sum(child_flops_total(r, epochs, steps, batch) for r in results)
    return {"engine": name, "children": len(results), "wall_s": wall_s, "children_per_min": 60 * len(results) / wall_s,
            "gflops": flops / wall_s / 1e9, "ms_per_step_mean": 1e3 * float((k * per_step).mean()),
            "protocol_min_sample": float(proto_child.mean() * outside * PROTOCOL_CHILDREN / 60),
            "protocol_min_space_fit": float(space_child.mean() * outside * PROTOCOL_CHILDREN / 60),
            "step_ms_fit": {"a_ms": 1e3 * a, "ms_per_gflop": 1e3 * b * 1e9}, "eval_s_mean": float(ev.mean())}


def protocol_check(train, val, num_classes: int, data_seed: int, device: torch.device) -> dict:
    """Every architecture of the space once, as the search calls the engine (one child per call)."""
    archs = [[dict(zip(SPACE, c))] for c in itertools.product(*SPACE.values())]
    target = PROTOCOL_TARGET_GPU_MIN if device.type == "cuda" else PROTOCOL_TARGET_MIN
    print(f"# protocol check: {len(archs)} architectures x {PROTOCOL_EPOCHS} epochs x {len(train)} train images, "
          f"fast engine, one child per call, device {device_name(device)}; loadavg {loadavg()}")
    if device.type == "cuda":   # first call pays CUDA context and kernel loading
        ne.train_children(archs[:1], train, val, num_classes=num_classes, seeds=[0], epochs=1, max_train=256,
                          device=device)
    rows, t0 = [], time.perf_counter()
    for i, arch in enumerate(archs):
        t1 = time.perf_counter()
        r = ne.train_children([arch], train, val, num_classes=num_classes, seeds=[2000 + i], data_seed=data_seed + i,
                              epochs=PROTOCOL_EPOCHS, engine="fast", device=device)[0]
        rows.append({"arch": arch, "wall_s": time.perf_counter() - t1, "val_acc": r["val_acc"], "params": r["params"]})
        a = arch[0]
        print(f"  f{a['filters']:<3} k{a['kernel']} d{a['dropout']:<4}  {rows[-1]['wall_s']:6.2f} s  val {r['val_acc']:.4f}")
    total = time.perf_counter() - t0
    proto = total / len(archs) * PROTOCOL_CHILDREN / 60
    print(f"mean {total / len(archs):.2f} s per child -> {PROTOCOL_CHILDREN} children: {proto:.1f} min "
          f"({'meets' if proto <= target else 'misses'} the {target:.0f}-minute target); "
          f"loadavg {loadavg()}")
    return {"children": rows, "total_s": total, "protocol_min": proto, "loadavg_end": loadavg()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    ds = load("organamnist", root=args.data_root)
    train, val = ds["train"], ds["val"]
    if args.protocol_check:
        out = protocol_check(train, val, ds.n_classes, args.data_seed, device)
        if args.json:
            from helpers.results import write_json
            write_json(args.json, out)
        return out
    max_train = None if args.max_train in (0, None) else args.max_train
    archs = sample_archs(args.children, args.seed)
    seeds = [1000 + i for i in range(args.children)]
    common = dict(num_classes=ds.n_classes, epochs=args.epochs, data_seed=args.data_seed, max_train=max_train,
                  device=device)
    ok, why = ne.kernels_available()
    header = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "kernels": ok,
              "kernels_note": why, "device": device_name(device),
              "loadavg_start": loadavg()}
    print("# NAS child training: plain vs fast engine on OrganAMNIST 28px")
    print("  " + "  ".join(f"{k}={v}" for k, v in header.items()))
    print(f"  {args.children} children, epochs={args.epochs}, train images={max_train or len(train)}, "
          f"val images={len(val)}, batch 128, data_seed={args.data_seed}")

    ne.train_children(archs[:1], train, val, seeds=[0], **{**common, "epochs": 1, "max_train": 256})  # warm-up

    plain, fast1 = [], []
    t_plain = t_fast1 = 0.0
    for i, (arch, seed) in enumerate(zip(archs, seeds)):
        runs = (("plain", plain), ("fast", fast1))
        for engine, sink in (runs if i % 2 == 0 else runs[::-1]):
            t0 = time.perf_counter()
            sink.append(ne.train_children([arch], train, val, seeds=[seed], engine=engine, **common)[0])
            dt = time.perf_counter() - t0
            if engine == "plain":
                t_plain += dt
            else:
                t_fast1 += dt
    batch_res, t_batch = None, None
    if not args.skip_batch:
        t0 = time.perf_counter()
        batch_res = ne.train_children(archs, train, val, seeds=seeds, engine="fast", **common)
        t_batch = time.perf_counter() - t0
    bf16 = None
    if args.bf16:
        bf16 = ne.train_children(archs, train, val, seeds=seeds, engine="plain", precision="bf16", **common)

    steps = plain[0]["n_train"] // 128
    print(f"\n{'child':>5} {'arch':<18} {'params':>8} {'val plain':>9} {'val fast':>9} "
          f"{'ms/step plain':>13} {'ms/step fast':>12}" + (f" {'val bf16':>9}" if bf16 else ""))
    for i, (p, f) in enumerate(zip(plain, fast1)):
        a = p["arch"][0]
        row = (f"{i:>5} f{a['filters']}-k{a['kernel']}-d{a['dropout']:<6} {p['params']:>8} {p['val_acc']:>9.4f} "
               f"{f['val_acc']:>9.4f} {1e3 * p['fit_s'] / (steps * args.epochs):>13.2f} "
               f"{1e3 * f['fit_s'] / (steps * args.epochs):>12.2f}")
        print(row + (f" {bf16[i]['val_acc']:>9.4f}" if bf16 else ""))

    full = len(train)
    summaries = [engine_summary("plain", plain, t_plain, args.epochs, 128, full, len(val)),
                 engine_summary("fast 1/call", fast1, t_fast1, args.epochs, 128, full, len(val))]
    if batch_res is not None:
        summaries.append(engine_summary("fast batch", batch_res, t_batch, args.epochs, 128, full, len(val)))
    mm32, mm16 = matmul_gflops(torch.float32, device), matmul_gflops(torch.bfloat16, device)
    print(f"\n{'engine':<12} {'children/min':>12} {'GFLOP/s':>8} {'ms/step':>8} "
          f"{'protocol min (sample)':>21} {'protocol min (space fit)':>24}")
    for s in summaries:
        print(f"{s['engine']:<12} {s['children_per_min']:>12.2f} {s['gflops']:>8.1f} {s['ms_per_step_mean']:>8.2f} "
              f"{s['protocol_min_sample']:>21.1f} {s['protocol_min_space_fit']:>24.1f}")
    print(f"torch matmul {matmul_size(device)} square on {device_name(device)}: fp32 {mm32:.1f} GFLOP/s, bf16 {mm16:.1f} GFLOP/s "
          f"(threads={torch.get_num_threads()})")
    ratio = summaries[1]["children_per_min"] / summaries[0]["children_per_min"]
    diffs = [abs(p["val_acc"] - f["val_acc"]) for p, f in zip(plain, fast1)]
    loss_rel = max(abs(p["final_train_loss"] - f["final_train_loss"]) / abs(p["final_train_loss"])
                   for p, f in zip(plain, fast1))
    batch_same = None if batch_res is None else all(
        b["val_acc"] == f["val_acc"] and b["epoch_losses"] == f["epoch_losses"] for b, f in zip(batch_res, fast1))
    va_p, va_f = [r["val_acc"] for r in plain], [r["val_acc"] for r in fast1]
    print(f"speed ratio fast 1/call / plain: {ratio:.1f}x"
          + (f"; fast batch / plain: {summaries[2]['children_per_min'] / summaries[0]['children_per_min']:.1f}x"
             if batch_res is not None else ""))
    print(f"max |val_acc plain - fast| = {max(diffs):.6f} ({max(diffs) * len(val):.0f} of {len(val)} images); "
          f"max relative final-loss difference {loss_rel:.2e}; Spearman(plain, fast) = {spearman(va_p, va_f):.4f}"
          + ("" if batch_same is None else f"; fast batch == fast 1/call: {batch_same}"))
    out = {"header": header, "args": vars(args), "archs": archs, "seeds": seeds, "summaries": summaries,
           "matmul_gflops": {"fp32": mm32, "bf16": mm16}, "speed_ratio": ratio, "max_val_acc_diff": max(diffs),
           "max_rel_final_loss_diff": loss_rel, "spearman_plain_fast": spearman(va_p, va_f),
           "batch_equals_single": batch_same,
           "children": [{"arch": p["arch"], "seed": p["seed"], "params": p["params"], "val_plain": p["val_acc"],
                         "val_fast": f["val_acc"], "fit_s_plain": p["fit_s"], "fit_s_fast": f["fit_s"],
                         "eval_s_plain": p["eval_s"], "eval_s_fast": f["eval_s"],
                         "loss_plain": p["final_train_loss"], "loss_fast": f["final_train_loss"]}
                        for p, f in zip(plain, fast1)]}
    if bf16:
        va_b = [r["val_acc"] for r in bf16]
        rho = spearman(va_p, va_b)
        print(f"bf16 (plain, autocast) vs fp32: Spearman of val accuracies {rho:.4f}, "
              f"max |diff| {max(abs(a - b) for a, b in zip(va_p, va_b)):.4f} (the fast engine is fp32)")
        out["bf16"] = {"spearman_vs_fp32": rho, "val": va_b}
    best = min(s["protocol_min_space_fit"] for s in summaries[1:])
    target = PROTOCOL_TARGET_GPU_MIN if device.type == "cuda" else PROTOCOL_TARGET_MIN
    verdict = "meets" if best <= target else "misses"
    print(f"projected full protocol ({PROTOCOL_CHILDREN} children x {PROTOCOL_EPOCHS} epochs, full train): "
          f"plain {summaries[0]['protocol_min_space_fit']:.0f} min, fast {best:.1f} min -> {verdict} the "
          f"{target:.0f}-minute target on {device_name(device)}")
    out["header"]["loadavg_end"] = loadavg()
    print(f"  loadavg at end: {out['header']['loadavg_end']}")
    if args.json:
        from helpers.results import write_json
        write_json(args.json, out)
        print(f"  wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
