"""Rules that forbid configurations of a search space, e.g. ``"kernel == 5 and filters >= 64"``.

A rule is a boolean expression over decision names; a configuration for which it is true is
forbidden. Accepted (anything else raises ``ValueError`` naming the rule and the construct):
comparisons ``== != < <= > >= in, not in`` (chains included), ``and``, ``or``, ``not``, parentheses,
decision names, int/float/str/bool constants (signed numbers included) and lists, tuples or sets
of constants. A rule must mention a decision. :func:`parse_rules` checks each rule's syntax tree
once and compiles it; only a checked tree is evaluated, with no builtins.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = ["Rule", "parse_rule", "parse_rules", "allowed", "sequential_mask"]

_OPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)
_WHAT = {ast.Call: "function call", ast.Attribute: "attribute access", ast.Subscript: "subscript",
         ast.BinOp: "arithmetic operator", **dict.fromkeys((ast.ListComp, ast.SetComp, ast.GeneratorExp), "comprehension")}


@dataclass(frozen=True)
class Rule:
    """A checked rule; ``rule(values)`` says whether the configuration ``values`` is **forbidden**."""

    text: str
    names: frozenset
    code: Any = field(repr=False, compare=False)

    def __call__(self, values: Mapping[str, Any]) -> bool:
        missing = self.names - set(values)
        if missing:
            raise ValueError(f"rule {self.text!r} needs decisions {sorted(missing)} that were not given")
        env = {k: values[k] for k in sorted(self.names)}
        try:
            return bool(eval(self.code, {"__builtins__": {}}, env))   # a checked tree (see _check)
        except TypeError as e:
            raise ValueError(f"rule {self.text!r} could not be evaluated with {env}: {e}") from e


def _check(node: ast.AST, text: str, names: list, used: set, literal: bool = False) -> None:
    """Raise unless ``node`` is in the grammar; collect the decision names it uses into ``used``."""
    def bad(what: str):
        raise ValueError(f"rule {text!r}: {what} is not allowed")

    def describe(n: ast.AST) -> str:
        return f"{_WHAT.get(type(n), type(n).__name__)} {ast.unparse(n)!r}"

    if isinstance(node, ast.Constant):
        if type(node.value) not in (bool, int, float, str):
            bad(f"constant {node.value!r}")
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        if not (isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
            bad(f"unary operator on {describe(node.operand)}")
    elif literal:
        bad(f"{describe(node)} inside a list/tuple/set (only constants)")
    elif isinstance(node, (ast.BoolOp, ast.UnaryOp)) and isinstance(node.op, (ast.And, ast.Or, ast.Not)):
        for v in node.values if isinstance(node, ast.BoolOp) else [node.operand]:
            _check(v, text, names, used)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if not isinstance(op, _OPS):
                bad(f"comparison operator {type(op).__name__}")
        for v in [node.left, *node.comparators]:
            _check(v, text, names, used)
    elif isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"rule {text!r}: unknown decision {node.id!r}; valid decisions are {names}")
        used.add(node.id)
    elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        for e in node.elts:
            _check(e, text, names, used, literal=True)
    else:
        bad(describe(node))


def parse_rule(rule: str | Rule, names: Iterable[str]) -> Rule:
    """Check one rule against the decision ``names`` (an already parsed rule: its names only)."""
    names = list(names)
    if isinstance(rule, Rule):
        unknown = sorted(rule.names - set(names))
        if unknown:
            raise ValueError(f"rule {rule.text!r}: unknown decision {unknown[0]!r}; valid decisions are {names}")
        return rule
    if not isinstance(rule, str):
        raise ValueError(f"a rule must be a string, got {type(rule).__name__}: {rule!r}")
    try:
        tree = ast.parse(rule.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"rule {rule!r} is not a valid expression: {e.msg}") from e
    used: set = set()
    _check(tree.body, rule, names, used)
    if not used:
        raise ValueError(f"rule {rule!r} mentions no decision; valid decisions are {names}")
    return Rule(rule, frozenset(used), compile(tree, f"<rule {rule!r}>", "eval"))


def parse_rules(rules: str | Rule | Iterable[str | Rule], names: Iterable[str]) -> list[Rule]:
    """:func:`parse_rule` on each rule (a single string is one rule)."""
    names = list(names)
    return [parse_rule(r, names) for r in ([rules] if isinstance(rules, (str, Rule)) else rules)]


def allowed(arch: Mapping[str, Any], rules) -> bool:
    """Whether the full configuration ``arch`` (decision -> value) breaks no rule."""
    return not any(r(arch) for r in parse_rules(rules, arch.keys()))


def sequential_mask(space: Mapping[str, Sequence], rules, chosen: Mapping[str, Any], decision: str) -> torch.Tensor:
    """Allowed values of ``decision`` given the decisions already ``chosen`` (``True`` = allowed).

    A value is forbidden when a rule that mentions ``decision`` and otherwise only ``chosen``
    decisions is true for it; rules still waiting on an unchosen decision are checked at a later
    step, so choosing in order with this mask yields only configurations :func:`allowed` accepts.
    """
    names = list(space)
    for name in [decision, *chosen]:
        if name not in space:
            raise ValueError(f"unknown decision {name!r}; valid decisions are {names}")
    if decision in chosen:
        raise ValueError(f"decision {decision!r} is already chosen")
    known = set(chosen) | {decision}
    relevant = [r for r in parse_rules(rules, names) if decision in r.names and r.names <= known]
    mask = torch.tensor([not any(r({**chosen, decision: v}) for r in relevant) for v in space[decision]],
                        dtype=torch.bool)
    if not bool(mask.any()):
        raise ValueError(f"no value of decision {decision!r} is allowed given {dict(chosen)}: {list(space[decision])}")
    return mask
