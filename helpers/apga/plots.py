"""The APGA page's figures: metric against k per method, the agents' per-update record, and the mask gallery."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plots import TEXT_WIDTH
from ..results import Recorder
from .protocol import find_unit


def kshot_figure(units: pd.DataFrame, metrics: Sequence[str] = ("test/acc", "test/auc")) -> plt.Figure:
    """Mean ± sd over seeds of each metric against k (one panel per dataset and metric), a line per method."""
    from ..page import human_name

    sets = list(dict.fromkeys(zip(units["flag"], units["size"])))
    fig, axes = plt.subplots(len(metrics), len(sets), figsize=(min(TEXT_WIDTH, 3.3 * len(sets) + 1.6),
                                                                2.3 * len(metrics) + 0.6), squeeze=False)
    for j, (flag, size) in enumerate(sets):
        sub = units[(units["flag"] == flag) & (units["size"] == size)]
        ks = list(dict.fromkeys(sub["k"]))
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            for n, (method, g) in enumerate(sub.groupby("method", sort=False, observed=True)):
                stats = g.groupby("k", sort=False)[metric].agg(["mean", "std"]).reindex(ks)
                pos = np.arange(len(ks)) + (n - 2.5) * 0.06
                ax.errorbar(pos, stats["mean"], yerr=stats["std"].fillna(0), marker="o", ms=3, capsize=2,
                            label=str(method))
            ax.set_xticks(range(len(ks)), [str(k) for k in ks])
            ax.set_xlabel("k (training images per class)")
            ax.set_ylabel(human_name(metric))
            if i == 0:
                ax.set_title(f"{flag} {size} px")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(labels)), frameon=False,
               bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def trace_figure(traces: pd.DataFrame, values: Sequence[str] = ("reward", "entropy", "erase_area"),
                 smooth: int = 5) -> plt.Figure:
    """The agents' per-update record (:func:`helpers.apga.protocol.agent_traces`): one panel per value
    and setting (dataset, size, k), a line per method and seed (a running mean over ``smooth``
    updates), against the agent update. Without any record, a figure that says so."""
    if not len(traces):
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "no agent record (no APGA unit ran)", ha="center", va="center")
        ax.axis("off")
        return fig
    traces = traces.assign(setting=traces["flag"].astype(str) + " " + traces["size"].astype(str) + "px k="
                           + traces["k"].astype(str))
    settings = list(dict.fromkeys(traces["setting"]))
    fig, axes = plt.subplots(len(values), len(settings), figsize=(min(TEXT_WIDTH, 3.2 * len(settings) + 1.4),
                                                                   1.9 * len(values) + 0.6), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(traces["method"]))}
    for j, setting in enumerate(settings):
        sub = traces[traces["setting"] == setting]
        for (method, seed), run in sub.groupby(["method", "seed"], sort=False):
            for i, value in enumerate(values):
                y = run[value].rolling(max(1, smooth), min_periods=1).mean()
                axes[i][j].plot(run["update"], y, color=colors[method], lw=0.9, alpha=0.8, ms=3,
                                marker="o" if len(run) < 10 else None,   # a run of one update is a point
                                label=str(method) if seed == sub["seed"].min() else None)
        for i, value in enumerate(values):
            axes[i][j].set_ylabel(value.replace("_", " "))
            if value == "entropy":
                axes[i][j].axhline(np.log(2), color="grey", lw=0.6, ls=":")
        axes[0][j].set_title(setting, fontsize=8)
        axes[-1][j].set_xlabel("agent update")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def gallery_figure(images: np.ndarray, columns: Mapping[str, np.ndarray], n: int = 6,
                   threshold: float = 0.5) -> plt.Figure:
    """Rows of probe images: the image, then each named map (values in [0, 1]) with the contour of
    its region (> ``threshold``) drawn on the image."""
    n = min(n, len(images))
    cols = 1 + len(columns)
    fig, axes = plt.subplots(n, cols, figsize=(min(TEXT_WIDTH, 1.25 * cols), 1.25 * n + 0.3), squeeze=False)
    for r in range(n):
        img = images[r, 0]
        axes[r][0].imshow(img, cmap="gray")
        for c, (name, maps) in enumerate(columns.items(), start=1):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray")
            ax.imshow(maps[r, 0], cmap="magma", alpha=0.55, vmin=0, vmax=1)
            if (maps[r, 0] > threshold).any() and (maps[r, 0] <= threshold).any():
                ax.contour(maps[r, 0] > threshold, levels=[0.5], colors="cyan", linewidths=0.7)
            if r == 0:
                ax.set_title(name, fontsize=7)
        if r == 0:
            axes[r][0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def gallery_arrays(recorder: Recorder, keys: Mapping) -> dict[str, np.ndarray]:
    """The maps of the probe images stored by the units of one (flag, size, k, seed): the agent's
    erase probability (APGA, faithful APGA), the end-to-end keep probability and the Grad-CAM map."""
    out = {}
    wanted = (("apga", "probe_erase_p", "APGA p(erase)"), ("apga_faithful", "probe_erase_p", "faithful p(erase)"),
              ("end2end", "probe_keep", "end-to-end p(keep)"), ("gradcam", "probe_gradcam", "Grad-CAM"))
    for method, array, name in wanted:
        found = find_unit(recorder, **keys, method=method)
        if found:
            scores = recorder.scores(**found)
            if array in scores:
                out[name] = scores[array]
    return out
