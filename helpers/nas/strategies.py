"""The search strategies as a table: what each one is, and the equal-budget control it answers to."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Strategy", "STRATEGIES", "COMPARISONS", "get_strategy", "learned_strategies"]


@dataclass(frozen=True)
class Strategy:
    """One way of choosing the children of a search.

    ``learns``: a controller trained with REINFORCE picks them (else uniform sampling);
    ``masked``: the mask rules forbid configurations; ``faithful``: the reference controller (one
    LSTM step on a zero input, independent heads) and no baseline; ``control``: the strategy that
    spends the same budget without learning, against which this one is judged (None for a control).
    """

    name: str
    what: str
    learns: bool
    masked: bool
    faithful: bool = False
    control: str | None = None


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("random", "uniform sampling over the whole space (the equal-budget non-RL control)",
             learns=False, masked=False),
    Strategy("random_masked", "uniform sampling over the space the mask rules allow (control for rl_masked)",
             learns=False, masked=True),
    Strategy("rl", "autoregressive LSTM controller, REINFORCE with a moving-average baseline",
             learns=True, masked=False, control="random"),
    Strategy("rl_masked", "the same, forbidden choices' logits set to -1e10 before the softmax",
             learns=True, masked=True, control="random_masked"),
    Strategy("rl_faithful", "the reference controller: one LSTM step on a constant zero input, no baseline",
             learns=True, masked=False, faithful=True, control="random"),
)}

# The paired tests on the NAS page: each RL variant against its equal-budget control, masked RL
# against unmasked random search (what the rules and RL buy together), and the sound controller
# against the reference one.
COMPARISONS = (("rl", "random"), ("rl_masked", "random_masked"), ("rl_masked", "random"), ("rl", "rl_faithful"))


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (``ValueError`` listing the valid ones otherwise)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def learned_strategies(names) -> list[str]:
    """Those of ``names`` whose children a learned controller picks (in the given order)."""
    return [n for n in names if get_strategy(n).learns]
