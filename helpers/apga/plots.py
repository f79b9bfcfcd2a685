"""The APGA page's figures: metric against k per method, and the mask gallery."""
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
