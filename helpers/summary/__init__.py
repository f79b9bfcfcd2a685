"""The book as one piece of research: what every chapter's final models did, read from their stored
results and weights only (nothing is trained here).

* :mod:`.chapters`: one declared entry per chapter (its RL methods and the equal-budget control of
  each method) and one reader that turns a run's stored units into final models
  (:class:`~.chapters.FinalUnit`), with how to rebuild each from its stored weights.
* :mod:`.leaderboard`: method x dataset, test ACC, AUC, balanced accuracy and kappa, mean ± std over
  seeds, and paired differences against each chapter's control (:mod:`helpers.stats`).
* :mod:`.calibration`: expected calibration error (equal-width bins) and reliability diagrams from
  the stored per-sample test scores.
* :mod:`.corruptions` and :mod:`.robustness`: five image corruptions at five severities, and the
  accuracy of each rebuilt final model on its corrupted test images.
* :mod:`.curves`: every RL method's ``rl/reward``, ``rl/baseline``, ``rl/entropy``; the fold
  diagnostics at a glance. :mod:`.published`: the published figures (``published.yaml``).
* :mod:`.figures`: reliability diagrams and accuracy against severity.

Used by ``notebooks/summary.ipynb`` (``needs: "*"`` in ``book/_runs.yml``).
"""
from .calibration import DEFAULT_BINS, calibration_tables, ece, reliability
from .chapters import CHAPTERS, FinalUnit, RunRef, final_units
from .corruptions import CORRUPTIONS, LEVELS, SEVERITIES, corrupt, ladder_table
from .curves import folds_overview, rl_curves, rl_figure
from .figures import reliability_figure, robustness_figure
from .leaderboard import (METRICS, coverage, differences_view, faithful_glue, for_page, full_runs_text, headline_glue,
                          leaderboard, paired_differences, per_seed, stored_runs)
from .published import beside_datasets, for_chapters, published_table
from .robustness import by_corruption, findings, relative_drop, robustness_rows, robustness_summary

__all__ = ["DEFAULT_BINS", "calibration_tables", "ece", "reliability", "CHAPTERS", "FinalUnit", "RunRef", "final_units",
           "CORRUPTIONS", "LEVELS", "SEVERITIES", "corrupt", "ladder_table", "folds_overview", "rl_curves",
           "rl_figure", "reliability_figure", "robustness_figure", "METRICS", "coverage", "differences_view", "faithful_glue", "for_page",
           "headline_glue", "full_runs_text",
           "leaderboard", "paired_differences", "per_seed", "stored_runs", "beside_datasets", "for_chapters",
           "published_table", "by_corruption", "findings", "relative_drop", "robustness_rows", "robustness_summary"]
