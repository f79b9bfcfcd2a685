"""Action masking from human-readable rules.

A *search space* maps decision names to their candidate values::

    space = {"filters": [16, 32, 64, 128], "kernel": [3, 5], "dropout": [0.1, 0.25, 0.5]}

A *rule* is a Python-like boolean expression over decision names that
describes a **forbidden** configuration: when it is true, the configuration
is not allowed::

    rules = ["filters == 128", "kernel == 5 and filters >= 64"]

* :func:`rule_masks` turns the single-decision rules (``"filters == 128"``)
  into one boolean mask per decision (``True`` = allowed), ready for
  :func:`helpers.rl.policies.masked_logits`. Rules that mention several
  decisions are ignored there.
* :func:`allowed` checks a full architecture against every rule.
* :func:`sequential_mask` masks one decision given the decisions already
  taken, which lets an autoregressive controller enforce multi-decision rules
  step by step.

Rules are never passed to ``eval``. They are parsed with :mod:`ast` and only
this grammar is accepted (anything else raises ``ValueError`` naming the
rule and the offending construct):

* comparisons ``==, !=, <, <=, >, >=, in, not in`` (chains like
  ``16 <= filters < 128`` included),
* ``and``, ``or``, ``not`` and parentheses,
* names, which must be decision names of the space,
* int / float / str / bool constants (``-3`` included) and lists, tuples or
  sets of such constants (``filters in [16, 32]``).

A rule must mention at least one decision.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, FrozenSet, Iterable, List, Mapping, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "Rule",
    "parse_rule",
    "parse_rules",
    "rule_masks",
    "allowed",
    "sequential_mask",
]

_COMPARE_OPS = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_CONSTANT_TYPES = (bool, int, float, str)

# Friendly names for the constructs people are most likely to try.
_NODE_NAMES = {
    "Call": "function call",
    "Attribute": "attribute access",
    "Subscript": "subscript",
    "Lambda": "lambda",
    "BinOp": "arithmetic operator",
    "IfExp": "conditional expression",
    "ListComp": "comprehension",
    "SetComp": "comprehension",
    "DictComp": "comprehension",
    "GeneratorExp": "comprehension",
    "Dict": "dict literal",
    "NamedExpr": "assignment expression",
    "JoinedStr": "f-string",
    "Starred": "starred expression",
    "Await": "await",
}


def _describe(node: ast.AST) -> str:
    kind = type(node).__name__
    try:
        src = ast.unparse(node)
    except Exception:  # pragma: no cover - unparse is total on parsed trees
        src = kind
    return f"{_NODE_NAMES.get(kind, kind)} {src!r}"


@dataclass(frozen=True)
class Rule:
    """A validated rule: its text, parsed tree and the decisions it mentions.

    Calling it with a mapping of decision values returns whether the rule is
    true, i.e. whether that configuration is **forbidden**.
    """

    text: str
    tree: ast.Expression
    names: FrozenSet[str]

    def __call__(self, values: Mapping[str, Any]) -> bool:
        missing = self.names - set(values)
        if missing:
            raise ValueError(
                f"rule {self.text!r} needs decisions {sorted(missing)} that were not given"
            )
        try:
            return bool(_evaluate(self.tree.body, values))
        except (TypeError, ValueError) as e:
            shown = {k: values[k] for k in sorted(self.names)}
            raise ValueError(f"rule {self.text!r} could not be evaluated with {shown}: {e}") from e


class _Validator:
    """Recursive check of the allowed grammar; collects the names used."""

    def __init__(self, text: str, valid_names: Sequence[str]):
        self.text = text
        self.valid = list(valid_names)
        self.valid_set = set(valid_names)
        self.names: set = set()

    def fail(self, what: str) -> None:
        raise ValueError(f"rule {self.text!r}: {what} is not allowed")

    def check(self, node: ast.AST) -> None:
        if isinstance(node, ast.BoolOp):
            if not isinstance(node.op, (ast.And, ast.Or)):  # pragma: no cover
                self.fail(f"boolean operator {type(node.op).__name__}")
            for v in node.values:
                self.check(v)
        elif isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                self.check(node.operand)
            else:
                self.check_literal(node)
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) not in _COMPARE_OPS:
                    self.fail(f"comparison operator {type(op).__name__}")
            self.check(node.left)
            for c in node.comparators:
                self.check(c)
        elif isinstance(node, ast.Name):
            if not isinstance(node.ctx, ast.Load):  # pragma: no cover
                self.fail(f"name store {node.id!r}")
            if node.id not in self.valid_set:
                raise ValueError(
                    f"rule {self.text!r}: unknown decision {node.id!r}; "
                    f"valid decisions are {self.valid}"
                )
            self.names.add(node.id)
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            for elt in node.elts:
                self.check_literal(elt)
        elif isinstance(node, ast.Constant):
            self.check_literal(node)
        else:
            self.fail(_describe(node))

    def check_literal(self, node: ast.AST) -> None:
        """Constants, optionally signed numbers."""
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = node.operand
            if (
                isinstance(inner, ast.Constant)
                and isinstance(inner.value, (int, float))
                and not isinstance(inner.value, bool)
            ):
                return
            self.fail(f"unary operator on {_describe(inner)}")
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, _CONSTANT_TYPES):
                self.fail(f"constant {node.value!r}")
            return
        self.fail(f"{_describe(node)} inside a list/tuple/set (only constants)")


def _evaluate(node: ast.AST, env: Mapping[str, Any]) -> Any:
    """Evaluate a tree that :class:`_Validator` accepted."""
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_evaluate(v, env) for v in node.values)
        return any(_evaluate(v, env) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        val = _evaluate(node.operand, env)
        if isinstance(node.op, ast.Not):
            return not val
        return -val if isinstance(node.op, ast.USub) else +val
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, env)
        for op, comp in zip(node.ops, node.comparators):
            right = _evaluate(comp, env)
            if not _COMPARE_OPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_evaluate(e, env) for e in node.elts]
    raise ValueError(f"unexpected node {type(node).__name__}")  # pragma: no cover


def parse_rule(rule: Union[str, Rule], names: Iterable[str]) -> Rule:
    """Parse and validate one rule against the decision ``names``.

    Raises:
        ValueError: syntax error, a construct outside the allowed grammar
            (function calls, attribute access, arithmetic, ...), an unknown
            decision name (the message lists the valid ones), or a rule that
            mentions no decision.
    """
    names = list(names)
    if isinstance(rule, Rule):
        unknown = sorted(rule.names - set(names))
        if unknown:
            raise ValueError(
                f"rule {rule.text!r}: unknown decision {unknown[0]!r}; valid decisions are {names}"
            )
        return rule
    if not isinstance(rule, str):
        raise ValueError(f"a rule must be a string, got {type(rule).__name__}: {rule!r}")
    try:
        tree = ast.parse(rule.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"rule {rule!r} is not a valid expression: {e.msg}") from e
    v = _Validator(rule, names)
    v.check(tree.body)
    if not v.names:
        raise ValueError(f"rule {rule!r} mentions no decision; valid decisions are {names}")
    return Rule(text=rule, tree=tree, names=frozenset(v.names))


def parse_rules(rules: Union[str, Rule, Iterable[Union[str, Rule]]], names: Iterable[str]) -> List[Rule]:
    """:func:`parse_rule` on each rule (a single string is one rule)."""
    names = list(names)
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    return [parse_rule(r, names) for r in rules]


def _check_space(space: Mapping[str, Sequence]) -> None:
    for name, values in space.items():
        if len(values) == 0:
            raise ValueError(f"decision {name!r} has no values")


def rule_masks(space: Mapping[str, Sequence], rules) -> dict:
    """Per-decision masks from the single-decision rules.

    Returns ``{name: BoolTensor(len(space[name]))}`` for *every* decision of
    ``space`` (``True`` = allowed). A value is forbidden when some rule that
    mentions only that decision is true for it. Rules mentioning several
    decisions are validated but otherwise ignored (see :func:`allowed` and
    :func:`sequential_mask`).

    Raises:
        ValueError: invalid/unknown rule, or a decision left with no allowed value.
    """
    _check_space(space)
    parsed = parse_rules(rules, space.keys())
    masks = {}
    for name, values in space.items():
        mine = [r for r in parsed if r.names == {name}]
        masks[name] = torch.tensor(
            [not any(r({name: v}) for r in mine) for v in values], dtype=torch.bool
        )
        if not bool(masks[name].any()):
            raise ValueError(f"rules forbid every value of decision {name!r}: {list(values)}")
    return masks


def allowed(arch: Mapping[str, Any], rules) -> bool:
    """Whether a full architecture ``{decision: value}`` violates no rule.

    Every rule (single- or multi-decision) is evaluated with ``arch``'s
    values; names in a rule must be keys of ``arch`` (``ValueError`` otherwise).
    """
    parsed = parse_rules(rules, arch.keys())
    return not any(r(arch) for r in parsed)


def sequential_mask(
    space: Mapping[str, Sequence], rules, chosen: Mapping[str, Any], decision: str
) -> Tensor:
    """Allowed values of ``decision`` given the decisions already ``chosen``.

    Value ``v`` is forbidden when some rule that mentions ``decision`` and
    whose other decisions are all in ``chosen`` is true for
    ``{**chosen, decision: v}``. Rules still waiting on an unchosen decision
    are skipped (they are checked at a later step); rules that involve only
    ``chosen`` decisions are not re-checked (they were at an earlier step).
    Sampling decisions in order with this mask therefore yields only
    architectures for which :func:`allowed` is true, as long as no step runs
    out of values.

    Returns:
        ``BoolTensor(len(space[decision]))``, ``True`` = allowed.

    Raises:
        ValueError: unknown ``decision``/chosen names, ``decision`` already in
            ``chosen``, invalid rules, or no allowed value left (a dead end
            the rules create for this partial choice).
    """
    _check_space(space)
    names = list(space.keys())
    if decision not in space:
        raise ValueError(f"unknown decision {decision!r}; valid decisions are {names}")
    unknown = [k for k in chosen if k not in space]
    if unknown:
        raise ValueError(f"unknown decision {unknown[0]!r} in chosen; valid decisions are {names}")
    if decision in chosen:
        raise ValueError(f"decision {decision!r} is already chosen")
    parsed = parse_rules(rules, names)
    known = set(chosen) | {decision}
    relevant = [r for r in parsed if decision in r.names and r.names <= known]
    mask = torch.tensor(
        [not any(r({**chosen, decision: v}) for r in relevant) for v in space[decision]],
        dtype=torch.bool,
    )
    if not bool(mask.any()):
        raise ValueError(
            f"no value of decision {decision!r} is allowed given {dict(chosen)}: {list(space[decision])}"
        )
    return mask
