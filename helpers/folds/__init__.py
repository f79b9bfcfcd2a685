"""Fold diagnostics: k-fold training around the shared ``fit`` with sound early stopping, per-fold
diagnostics, rules that turn them into recommendations with their evidence, and the loop closed
by a measured before/after run on the same folds (then the chosen config once on test).

Modules: :mod:`.targets` (classification or an ordinal label as a number; metrics; the epoch
probe), :mod:`.cv` (folds from the split file, fold units that never see test, the final unit),
:mod:`.diagnostics` (the per-fold table), :mod:`.rules` (the rules as data), :mod:`.compare`
(paired before/after), :mod:`.groups` (subgroup columns beyond the class or grade), :mod:`.loop`
(all of it for one target), :mod:`.figures`.
"""
from .compare import (choose_config, config_table, diagnostics_view, final_table, outcome_sentence, paired_folds,
                      fold_histories, per_fold_differences, subgroup_summary, summary_over_folds)
from .cv import Arm, check_configs, final_unit, fold_datasets, fold_file, fold_unit, run_folds, unit_variant
from .diagnostics import COLUMNS, diagnose_fold, fold_table, out_of_fold, pooled_metrics, subgroup_table
from .groups import GroupColumn, group_frame, parse_groups
from .loop import TargetResult, close_loop
from .rules import (RULES, Rule, apply_recommendations, config_differences, evaluate_rules,
                    recommendation_sentences, rules_table)
from .targets import FoldProbe, RegressionLoss, RegressionScorer, Target, ordinal_metrics, round_grades

__all__ = ["Arm", "check_configs", "unit_variant", "COLUMNS", "FoldProbe", "RULES", "RegressionLoss", "RegressionScorer", "Rule", "Target",
           "TargetResult", "apply_recommendations", "choose_config", "close_loop", "config_differences", "config_table", "diagnostics_view",
           "final_table", "fold_histories", "summary_over_folds", "subgroup_summary", "GroupColumn", "group_frame",
           "parse_groups",
           "diagnose_fold", "evaluate_rules", "final_unit", "fold_datasets", "fold_file", "fold_table",
           "fold_unit", "ordinal_metrics", "out_of_fold", "outcome_sentence", "paired_folds",
           "per_fold_differences", "pooled_metrics", "recommendation_sentences", "round_grades", "rules_table",
           "run_folds", "subgroup_table"]
