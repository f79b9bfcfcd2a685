"""The search space: decisions repeated over layers, masked by rules per layer; architecture keys."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .rules import Rule, parse_rules, sequential_mask

__all__ = ["DEFAULT_SPACE", "SearchSpace", "arch_key", "arch_from_key", "flat_arch"]

DEFAULT_SPACE = {"filters": [16, 32, 64, 128], "kernel": [3, 5], "dropout": [0.1, 0.25, 0.5]}


@dataclass
class SearchSpace:
    """Decisions (name -> list of choices), the same for each of ``layers`` conv layers.

    An architecture is emitted as one token per (layer, decision), layer by layer. Mask rules
    (:mod:`helpers.nas.rules`) apply within each layer: ``"filters == 128"`` forbids 128 filters in
    every layer, and a rule over two decisions relates the two of the same layer.
    """

    decisions: Mapping[str, Sequence[Any]] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    layers: int = 1

    def __post_init__(self):
        self.decisions = {k: list(v) for k, v in self.decisions.items()}
        missing = {"filters", "kernel", "dropout"} - set(self.decisions)
        if missing:
            raise ValueError(f"search space needs decisions {sorted(missing)}; got {list(self.decisions)}")
        empty = [k for k, v in self.decisions.items() if not v]
        if empty:
            raise ValueError(f"decision {empty[0]!r} has no values")

    @property
    def tokens(self) -> list[tuple[int, str]]:
        """(layer, decision) in emission order."""
        return [(layer, name) for layer in range(self.layers) for name in self.decisions]

    def n_choices(self) -> list[int]:
        return [len(self.decisions[name]) for _, name in self.tokens]

    def decode(self, indices: Sequence[int]) -> list[dict]:
        """Token indices -> architecture (list of per-layer dicts)."""
        arch = [dict() for _ in range(self.layers)]
        for (layer, name), i in zip(self.tokens, indices):
            arch[layer][name] = self.decisions[name][int(i)]
        return arch

    def parse_rules(self, rules: Sequence[str | Rule]) -> list[Rule]:
        """The rules checked against this space's decisions, once (pass the result to :meth:`mask`)."""
        return parse_rules(rules, self.decisions)

    def mask(self, rules: Sequence[str | Rule], chosen_idx: Sequence[int]) -> torch.Tensor:
        """Allowed choices of the next token given the tokens chosen so far (rules apply per layer)."""
        t = len(chosen_idx)
        layer, name = self.tokens[t]
        if not rules:
            return torch.ones(len(self.decisions[name]), dtype=torch.bool)
        chosen = {n: self.decisions[n][int(i)] for (l, n), i in zip(self.tokens[:t], chosen_idx) if l == layer}
        return sequential_mask(self.decisions, rules, chosen, name)

    def all_indices(self, rules: Sequence[str | Rule] = ()) -> list[tuple[int, ...]]:
        """Every allowed architecture as token indices (for random search and exact marginals)."""
        rules = self.parse_rules(rules)
        out = []
        for combo in itertools.product(*[range(n) for n in self.n_choices()]):
            if all(bool(self.mask(rules, combo[:t])[combo[t]]) for t in range(len(combo))):
                out.append(combo)
        return out


def arch_key(arch: Sequence[Mapping[str, Any]]) -> str:
    """Readable identifier of an architecture, e.g. ``f16-k3-d0.5`` (layers joined by ``|``)."""
    return "|".join(f"f{l['filters']}-k{l['kernel']}-d{l['dropout']}" for l in arch)


def arch_from_key(key: str) -> list[dict]:
    """Inverse of :func:`arch_key`: ``"f16-k3-d0.5"`` -> ``[{"filters": 16, "kernel": 3, "dropout": 0.5}]``."""
    arch = []
    for layer in key.split("|"):
        f, k, d = layer.split("-")
        arch.append({"filters": int(f[1:]), "kernel": int(k[1:]), "dropout": float(d[1:])})
    return arch


def flat_arch(arch: Sequence[Mapping[str, Any]]) -> dict:
    """Columns of an architecture: ``filters, kernel, dropout`` (one layer) or ``l0.filters, ...``."""
    if len(arch) == 1:
        return dict(arch[0])
    return {f"l{i}.{k}": v for i, layer in enumerate(arch) for k, v in layer.items()}
