"""The plotting helpers: the layout each page relies on, drawn from small synthetic frames."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from helpers import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _histories(with_flag: bool) -> pd.DataFrame:
    rows = [{"flag": f, "model": m, "seed": s, "epoch": e, "train/loss": 1 / e, "val/loss": 1.2 / e, "val/auc": 0.5 + e / 10}
            for f in ("a", "b") for m in ("cnn", "seresnet") for s in (0, 1) for e in range(1, 4)]
    df = pd.DataFrame(rows)
    return df if with_flag else df[df["flag"] == "a"].drop(columns="flag")


def _grid(fig) -> tuple[int, int]:
    spec = fig.axes[0].get_subplotspec().get_gridspec()
    return spec.nrows, spec.ncols


def test_learning_curves_one_row_per_metric_one_column_per_flag():
    fig = plots.learning_curves(_histories(True))
    assert _grid(fig) == (3, 2)
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["train loss", "val loss", "val AUC"]


def test_learning_curves_without_columns_lays_metrics_side_by_side():
    fig = plots.learning_curves(_histories(False), col="none")
    assert _grid(fig) == (1, 3)
    assert [ax.get_ylabel() for ax in fig.axes] == ["train loss", "val loss", "val AUC"]
    assert fig.axes[-1].get_legend() is not None and fig.axes[0].get_legend() is None


def test_learning_curves_skips_missing_metrics():
    fig = plots.learning_curves(_histories(False), metrics=("train/loss", "no/such"), col="none")
    assert _grid(fig) == (1, 1)


def test_action_probabilities_one_panel_per_strategy_and_decision():
    rng = np.random.default_rng(0)
    rows = []
    for strat in ("rl", "rl_masked"):
        for seed in (0, 1):
            for ep in range(1, 6):
                p = rng.dirichlet(np.ones(2))
                rows.append({"strategy": strat, "seed": seed, "episode": ep, "p/kernel=3": p[0], "p/kernel=5": p[1],
                             "p/filters=16": 0.5, "p/filters=32": 0.5})
    fig = plots.action_probabilities(pd.DataFrame(rows), ["rl", "rl_masked"])
    assert _grid(fig) == (2, 2)
    assert fig.axes[0].get_title() == "rl: kernel" and fig.axes[0].get_ylim() == (0, 1)


def test_reward_curves_moving_average_is_drawn_per_strategy():
    df = pd.DataFrame({"strategy": ["rl"] * 6 + ["random"] * 6, "seed": ([0] * 3 + [1] * 3) * 2,
                       "episode": [1, 2, 3] * 4, "rl/reward": np.linspace(0, 1, 12)})
    fig = plots.reward_curves(df, window=2)
    ax = fig.axes[0]
    assert "moving average over 2" in ax.get_ylabel()
    legend = ax.get_legend()
    assert {t.get_text() for t in legend.get_texts()} == {"rl", "random"}
    assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1   # outside the plotting area


def _drawn_width_in(fig) -> float:
    """Width of the saved figure (tight bounding box, legends included), in inches."""
    fig.canvas.draw()
    return fig.get_tightbbox(fig.canvas.get_renderer()).width


@pytest.mark.parametrize("make", [
    lambda: plots.learning_curves(_histories(True)),
    lambda: plots.learning_curves(_histories(False), col="none"),
    lambda: plots.reward_curves(pd.DataFrame({"strategy": ["rl", "random"] * 6, "seed": [0] * 12,
                                              "episode": np.repeat(np.arange(1, 7), 2), "rl/reward": np.linspace(0, 1, 12)})),
    lambda: plots.compare_with_published(
        pd.DataFrame({"flag": ["a", "a", "b", "b", "c", "c"], "model": ["cnn", "densenet121"] * 3,
                      "test/acc": np.linspace(0.5, 0.9, 6)}),
        pd.DataFrame({"flag": ["a", "b", "c"], "method": ["ResNet-18 (28)"] * 3, "acc": [0.8, 0.8, 0.8]})),
], ids=["learning-grid", "learning-row", "reward", "published"])
def test_figures_fit_the_text_column(make):
    fig = make()
    assert _drawn_width_in(fig) <= plots.TEXT_WIDTH + 0.3


def test_single_point_curves_show_markers():
    """One epoch (the smoke defaults): a line of one point draws nothing without a marker."""
    df = _histories(True)
    fig = plots.learning_curves(df[df["epoch"] == 1])
    assert all(any(line.get_marker() not in (None, "None", "") and len(line.get_xdata()) for line in ax.lines)
               for ax in fig.axes)
