"""Figures and tables of the noise-mask page: policy curves, mask galleries, mean masks, k-shot curves,
paired tallies, and the reference's published numbers (another dataset: RadImageNet)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from ..plots import TEXT_WIDTH
from ..stats import holm, paired_comparison
from .mask import MaskConfig, blur, upsample
from .mix import MixDataset

__all__ = ["PUBLISHED", "PUBLISHED_SOURCE", "COLORS", "phase_curves", "policy_curves", "mask_gallery", "mean_mask_per_class",
           "kshot_curves", "tallies", "tally_wide", "decomposition_rows", "transfer_tests", "wins"]

#: The reference's published RadImageNet row (the author's project page; setting unnamed there).
PUBLISHED = pd.DataFrame([
    {"dataset": "RadImageNet (published, another dataset)", "method": "plain", "f1": 0.5226, "balanced_acc": 0.5014},
    {"dataset": "RadImageNet (published, another dataset)", "method": "policy", "f1": 0.5468, "balanced_acc": 0.5211},
])
PUBLISHED_SOURCE = ("Yavuz & Yang, Policy Gradient-Driven Noise Mask (arXiv 2406.14568, ICPR 2024), the author's "
                    "project page: baseline vs policy gradient on RadImageNet; it also claims better results on 11 of 13 datasets.")


#: One colour per method (and per transfer start) on every figure of the page.
COLORS = {"plain": "C0", "random": "C1", "policy": "C2", "faithful": "C3", "scratch": "C7"}


def phase_curves(histories: pd.DataFrame, metrics: Sequence[str] = ("val/loss", "val/acc"),
                 offset: int = 0) -> plt.Figure:
    """Validation curves of phase 1 (with masks) and of phase 2 and the plain control (without), per
    method, mean over seeds with a ±1 sd band; colours fixed per method. Phase 2's epochs are shifted
    by ``offset`` (phase 1's epochs), so they line up with the plain control's epochs of the same budget."""
    histories = histories.copy()
    shift = (histories["stage"] == "finetune") & (histories["method"] != "plain")
    histories.loc[shift, "epoch"] = histories.loc[shift, "epoch"] + offset
    stages = [s for s in ("pretrain", "finetune") if s in set(histories["stage"])]
    titles = {"pretrain": "phase 1 (with masks)", "finetune": "phase 2 and plain (no masks)"}
    fig, axes = plt.subplots(len(metrics), len(stages), figsize=(TEXT_WIDTH, 2.0 * len(metrics) + 0.6),
                             squeeze=False, sharex="col")
    for j, st in enumerate(stages):
        sub = histories[histories["stage"] == st]
        for i, m in enumerate(metrics):
            ax = axes[i][j]
            sns.lineplot(data=sub, x="epoch", y=m, hue="method", palette=COLORS, errorbar="sd", marker="o", ax=ax,
                         legend=False)
            ax.set_title(titles[st] if i == 0 else "", fontsize=9)
            ax.set_ylabel(m.replace("/", " ") if j == 0 else "")
            ax.set_xlabel("epoch of the total budget" if st == "finetune" else "epoch")
    handles = [plt.Line2D([], [], color=COLORS[m], marker="o", label=m) for m in COLORS
               if m in set(histories["method"])]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def policy_curves(trace: pd.DataFrame, window: int = 10) -> plt.Figure:
    """Per-batch reward with its baseline, advantage, entropy and mean mask value during phase 1,
    per method (moving average over ``window`` batches; mean over seeds, band ±1 sd)."""
    df = trace.sort_values(["method", "seed", "step"]).copy()
    keys = [k for k in ("rl/reward", "rl/baseline", "rl/entropy", "noise/mask_mean") if k in df]
    for k in keys:
        df[k] = df.groupby(["method", "seed"])[k].transform(lambda s: s.rolling(window, min_periods=1).mean())
    fig, axes = plt.subplots(1, len(keys), figsize=(TEXT_WIDTH, 2.6), squeeze=False)
    names = {"rl/reward": "reward (-CE)", "rl/baseline": "baseline", "rl/entropy": "entropy (sum over cells)",
             "noise/mask_mean": "mean mask value"}
    for ax, k in zip(axes[0], keys):
        # the random control learns nothing (no baseline, a fixed entropy); faithful has no baseline
        hide = {"rl/baseline": ("random", "faithful"), "rl/entropy": ("random",)}.get(k, ())
        sub = df[~df["method"].isin(hide)]
        sns.lineplot(data=sub, x="step", y=k, hue="method", palette=COLORS, errorbar="sd", ax=ax,
                     legend=k == keys[-1])
        ax.set_title(names[k], fontsize=9)
        ax.set_ylabel("")
        ax.set_xlabel("batch")
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=fig.transFigure,
                        ncol=4, frameon=False, title=None)
    fig.subplots_adjust(left=0.07, right=0.98, wspace=0.45, top=0.88, bottom=0.3)
    return fig


def _show(img: torch.Tensor, mean: float, std: float) -> np.ndarray:
    """A normalised image back on the [0, 1] display scale (so a masked image fades to ``mean``)."""
    img = (img.float() * std + mean).clamp(0, 1)
    return img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy()


@torch.no_grad()
def mask_gallery(policy, mix: MixDataset, masks: MaskConfig, per_dataset: int = 3, seed: int = 0,
                 split: str = "test", mean: float = 0.5, std: float = 0.5) -> plt.Figure:
    """For ``per_dataset`` images of each modality: the image, a sampled mask, and the masked image."""
    gen = torch.Generator().manual_seed(seed)
    flags = mix.joint.flags
    fig, axes = plt.subplots(len(flags), 3 * per_dataset, figsize=(TEXT_WIDTH, 0.85 * len(flags) + 0.4), squeeze=False)
    policy.eval()
    dev = next(iter(policy.buffers())).device
    for i, flag in enumerate(flags):
        idx = torch.nonzero(mix.source[split] == i).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)[:per_dataset]]
        x = (mix[split].images[idx].float() / 255 - mean) / std
        dist = policy(x.to(dev))
        cells = dist.sample().clamp(1e-6, 1 - 1e-6).cpu()
        m = blur(upsample(cells, masks.grid, tuple(x.shape[-2:])), masks.kernel, masks.sigma)
        for j in range(len(idx)):
            for c, (img, title, cmap) in enumerate(((x[j], "image", "gray"), (m[j], "mask", "magma"),
                                                    (x[j] * m[j], "masked", "gray"))):
                ax = axes[i][3 * j + c]
                ax.imshow(_show(img, mean, std) if c != 1 else m[j, 0].numpy(), cmap=cmap, vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=7)
        axes[i][0].set_ylabel(flag.replace("mnist", ""), fontsize=7)
        for ax in axes[i][3 * len(idx):]:
            ax.axis("off")
    fig.tight_layout(pad=0.3)
    return fig


@torch.no_grad()
def mean_mask_per_class(policy, mix: MixDataset, masks: MaskConfig, split: str = "test", max_per_class: int = 64,
                        mean: float = 0.5, std: float = 0.5, ncols: int = 8) -> plt.Figure:
    """The policy's expected mask (Beta means, upsampled and blurred) averaged over up to
    ``max_per_class`` images of each joint class, one panel per class, on one colour scale."""
    policy.eval()
    dev = next(iter(policy.buffers())).device
    labels = mix[split].labels
    panels = []
    for c in range(mix.n_classes):
        idx = torch.nonzero(labels == c).flatten()[:max_per_class]
        if not len(idx):
            continue
        x = (mix[split].images[idx].float() / 255 - mean) / std
        cells = policy(x.to(dev)).mean.cpu()
        m = blur(upsample(cells, masks.grid, tuple(x.shape[-2:])), masks.kernel, masks.sigma).mean(0)[0]
        panels.append((mix.label_names[str(c)], m.numpy()))
    rows = -(-len(panels) // ncols)
    lo, hi = min(p.min() for _, p in panels), max(p.max() for _, p in panels)
    fig, axes = plt.subplots(rows, ncols, figsize=(TEXT_WIDTH, 1.1 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, panels):
        im = ax.imshow(m, cmap="magma", vmin=lo, vmax=hi)
        flag, _, cls = name.partition(": ")
        ax.set_title(f"{flag.replace('mnist', '')}\n{cls[:13]}", fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="mean mask value")
    return fig


def kshot_curves(df: pd.DataFrame, metrics: Sequence[str] = ("test/balanced_acc", "test/auc")) -> plt.Figure:
    """Held-out test metrics against training images per class (``k``; "all" at the right), per initialisation."""
    df = df.copy()
    order = sorted(k for k in df["k"].unique() if k)
    df["k shown"] = df["k"].map(lambda k: str(k) if k else "all")
    cats = [str(k) for k in order] + (["all"] if (df["k"] == 0).any() else [])
    df["k shown"] = pd.Categorical(df["k shown"], cats, ordered=True)
    fig, axes = plt.subplots(1, len(metrics), figsize=(TEXT_WIDTH, 2.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        sns.pointplot(data=df, x="k shown", y=m, hue="init", palette=COLORS, errorbar="sd", dodge=0.3, ax=ax,
                      legend=m == metrics[-1],
                      markersize=4, capsize=0.1)
        ax.set_xlabel("training images per class (k)")
        ax.set_ylabel(m.replace("test/", "test ").replace("_", " "))
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title="start from")
    fig.tight_layout()
    return fig


def tallies(per_ds: pd.DataFrame, pairs: Sequence[tuple[str, str]], metrics: Sequence[str]) -> pd.DataFrame:
    """Paired tests over seeds (:func:`helpers.stats.paired_comparison`) of each pair on each dataset
    and metric, plus the mean over datasets ("all datasets"); Holm-adjusted within each metric."""
    rows = []
    mean_ds = per_ds.groupby(["method", "seed"], as_index=False)[list(metrics)].mean().assign(dataset="all datasets")
    frames = [per_ds, mean_ds]
    for frame in frames:
        for ds, sub in frame.groupby("dataset", sort=False):
            for metric in metrics:
                for a, b in pairs:
                    if {a, b} <= set(sub["method"]):
                        rows.append(paired_comparison(sub, a, b, metric, by="method", unit="seed", dataset=ds))
    out = pd.DataFrame(rows)
    if len(out):
        out["p_holm"] = np.nan
        for metric, idx in out.groupby("metric").groups.items():
            out.loc[idx, "p_holm"] = holm(out.loc[idx, "p"].to_numpy())
    return out


def tally_wide(tally: pd.DataFrame) -> pd.DataFrame:
    """:func:`tallies` as one row per (dataset, metric) and one column per pair: ``difference (Holm p)``."""
    t = tally.copy()
    t["pair"] = t["a"] + " − " + t["b"]
    t["cell"] = [f"{d:+.4f} (p {p:.2f})" if np.isfinite(p) else f"{d:+.4f} (–)" for d, p in zip(t["mean_diff"], t["p_holm"])]
    out = t.pivot_table(index=["dataset", "metric"], columns="pair", values="cell", aggfunc="first", sort=False)
    return out[list(dict.fromkeys(t["pair"]))].reset_index()


def decomposition_rows(tally: pd.DataFrame, metric: str, dataset: str = "all datasets"):
    """The (policy vs plain, random vs plain, policy vs random) rows of :func:`tallies` for ``metric``,
    as :func:`helpers.report.decomposition_sentence` takes them; ``None`` when one is missing."""
    sub = tally[(tally["dataset"] == dataset) & (tally["metric"] == metric)]
    rows = []
    for a, b in (("policy", "plain"), ("random", "plain"), ("policy", "random")):
        sel = sub[(sub["a"] == a) & (sub["b"] == b)]
        if sel.empty:
            return None
        rows.append(sel.iloc[0])
    return tuple(rows)


def transfer_tests(shots: pd.DataFrame, metric: str = "test/balanced_acc") -> pd.DataFrame:
    """Paired tests over seeds of the transfer starts at each ``k`` (policy vs plain, each vs scratch)."""
    from ..stats import compare_pairs

    pairs = [("policy", "plain"), ("policy", "scratch"), ("plain", "scratch")]
    frames = [compare_pairs(sub, pairs, metric, by="init", unit="seed", k="all" if not k else int(k))
              for k, sub in shots.groupby("k")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def wins(per_ds: pd.DataFrame, methods: Sequence[str], metric: str, against: str = "plain") -> pd.DataFrame:
    """On how many datasets each method's mean ``metric`` beats ``against``'s (ties do not count)."""
    means = per_ds.groupby(["dataset", "method"])[metric].mean().unstack("method")
    rows = [{"method": m, "metric": metric, "wins": int((means[m] > means[against]).sum()), "datasets": len(means)}
            for m in methods if m in means and m != against]
    return pd.DataFrame(rows)
