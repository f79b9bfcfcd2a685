"""The search strategies as a table: what each one is, and the equal-budget control it answers to."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Strategy", "STRATEGIES", "COMPARISONS", "DECOMPOSITIONS", "CONTROLLERS", "get_strategy",
           "learned_strategies", "controller_label"]


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
    Strategy("rl_faithful_masked", "the reference controller with the mask rules (the reference's masked phase)",
             learns=True, masked=True, faithful=True, control="random_masked"),
)}

# What picks the children, in words, for labelling every row of a table (published rows included).
CONTROLLERS = {"none": "none (uniform sampling)",
               "sound": "sound: autoregressive LSTM, moving-average baseline",
               "faithful": "faithful: constant-input LSTM, no baseline (the reference's)"}


def controller_label(name: str) -> str:
    """The controller of strategy ``name`` in words (see :data:`CONTROLLERS`)."""
    spec = get_strategy(name)
    return CONTROLLERS["none" if not spec.learns else "faithful" if spec.faithful else "sound"]

# The paired tests on the NAS page (the first four are the original ones): each RL variant against
# its equal-budget control, masked RL against unmasked random search (what the rules and RL buy
# together), the sound controller against the reference one, then the mask alone (random_masked vs
# random) and the reference controller against random search.
COMPARISONS = (("rl", "random"), ("rl_masked", "random_masked"), ("rl_masked", "random"), ("rl", "rl_faithful"),
               ("random_masked", "random"), ("rl_faithful", "random"),
               ("rl_faithful_masked", "random_masked"), ("rl_faithful_masked", "random"))

# (total, mask, RL): ``total`` = a vs c splits exactly, seed by seed, into ``mask`` = b vs c (the
# rules without learning) plus ``RL`` = a vs b (learning on top of the rules), b = random_masked.
DECOMPOSITIONS = ((("rl_masked", "random"), ("random_masked", "random"), ("rl_masked", "random_masked")),
                  (("rl_faithful_masked", "random"), ("random_masked", "random"), ("rl_faithful_masked", "random_masked")))


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (``ValueError`` listing the valid ones otherwise)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def learned_strategies(names) -> list[str]:
    """Those of ``names`` whose children a learned controller picks (in the given order)."""
    return [n for n in names if get_strategy(n).learns]
