"""RL architecture search after RLMedNAS (Zoph & Le, ICLR 2017): space, controller, search, children.

An architecture is a list of per-layer dicts ``{"filters": 16, "kernel": 3, "dropout": 0.5}``.

* :mod:`.space` and :mod:`.rules`: the decisions repeated over layers, and rules forbidding some
  configurations (``"filters == 128"``), applied per layer.
* :mod:`.strategies`: the table of strategies (``random``, ``random_masked``, ``rl``, ``rl_masked``,
  ``rl_faithful``, ``rl_faithful_masked``), each with its equal-budget control and controller, the
  page's comparisons and the mask/RL decompositions.
* :mod:`.controller`: the LSTM controller (autoregressive; ``faithful=True`` the reference one).
* :mod:`.search`: one search per (strategy, seed) with REINFORCE on ``R = val_acc - lam * params``.
* :mod:`.children`: training children (:class:`helpers.models.NASChild`) with the plain or the fast
  engine (:mod:`.fast`, C kernels), their dropout streams (:mod:`.dropout`) and cache (:mod:`.cache`).
* :mod:`.analysis`: the reference's table, champions, paired tests (Holm-adjusted) and their sentences.
* :mod:`.protocol`: like-for-like rows beside the published table, the differences from the
  reference, shared sampling, how far the controllers moved, which engine measured each child.
"""
from ..models.nas_child import NASChild, child_flops, child_params, keep_threshold, nas_child, normalize_arch
from .analysis import (METRICS, baselines_note, champion_fit_config, champions, champions_beside_baselines,
                       compare_strategies, describe_comparison, describe_decomposition, describe_tests,
                       paired_comparison, paired_tests, phase_table, retrain_champions, val_test_note, with_controller)
from .cache import ChildCache
from .child_data import clear_data_cache
from .children import ENGINES, PRECISIONS, train_children
from .controller import Controller
from .dropout import DropoutStream
from .fast.kernels import kernels_available
from .protocol import (LIKE_FOR_LIKE, beside_published, engine_table, probability_note, reference_differences,
                       shared_picks, updates_per_search)
from .rules import Rule, allowed, parse_rule, parse_rules, sequential_mask
from .search import ChildConfig, ControllerConfig, SearchConfig, make_evaluator, reward, run_search, search_all
from .space import DEFAULT_SPACE, SearchSpace, arch_from_key, arch_key
from .strategies import (COMPARISONS, CONTROLLERS, DECOMPOSITIONS, STRATEGIES, Strategy, controller_label,
                         get_strategy, learned_strategies)

__all__ = [
    # space, rules, strategies
    "DEFAULT_SPACE", "SearchSpace", "arch_key", "arch_from_key", "Rule", "parse_rule", "parse_rules", "allowed",
    "sequential_mask", "Strategy", "STRATEGIES", "COMPARISONS", "DECOMPOSITIONS", "CONTROLLERS", "get_strategy",
    "learned_strategies", "controller_label",
    # controller and search
    "Controller", "SearchConfig", "ControllerConfig", "ChildConfig", "reward", "run_search", "make_evaluator", "search_all",
    # analysis
    "phase_table", "champions", "paired_comparison", "compare_strategies", "describe_comparison",
    "retrain_champions", "champions_beside_baselines", "baselines_note", "METRICS", "paired_tests", "describe_tests",
    "describe_decomposition", "champion_fit_config", "val_test_note", "with_controller",
    # protocol
    "LIKE_FOR_LIKE", "beside_published", "updates_per_search", "reference_differences", "shared_picks",
    "probability_note", "engine_table",
    # children
    "NASChild", "nas_child", "normalize_arch", "child_params", "child_flops", "keep_threshold", "DropoutStream",
    "ENGINES", "PRECISIONS", "train_children", "ChildCache", "kernels_available", "clear_data_cache",
]
