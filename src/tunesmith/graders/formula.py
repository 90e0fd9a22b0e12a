"""`calculate_output` of a multi grader, read with `ast` and evaluated by walking the tree:
never `eval`. What OpenAI's formulas allow: numbers, the graders' names, + - * / and ^ (a
power, as in OpenAI's formulas; ** too), %, unary minus, parentheses and the functions min,
max, abs, floor, ceil, exp, sqrt and log.

    python -c "from tunesmith.graders.formula import evaluate; print(evaluate('0.5 * a + max(b, 0.2) ^ 2', {'a': 1, 'b': 0.1}))"
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from tunesmith.errors import UsageError

FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "sqrt": math.sqrt, "log": math.log,
}
ARITY = {"min": (2, 64), "max": (2, 64), "log": (1, 2)}
"""How many arguments each function takes (the others: one); a call with others is refused
when the formula is checked, not a TypeError when it runs."""
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow, ast.Mod: operator.mod}
MAX_LENGTH = 2000
MAX_DEPTH = 100
"""Nesting of the formula's tree: evaluating it recurses once per level (Python's limit is 1,000)."""


class FormulaError(UsageError):
    """A formula that does not parse, uses what is not allowed, or names an unknown grader."""


def parse_formula(text: str, names: set[str] | frozenset[str]) -> ast.Expression:
    """The checked syntax tree of `text`; a FormulaError says what is not allowed, and where."""
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"calculate_output is {len(text)} characters; at most {MAX_LENGTH}")
    text = text.replace("^", "**")  # OpenAI's power, with a power's precedence (Python's ^ binds looser than +)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"calculate_output does not parse: {exc.msg} at column {exc.offset}") from None
    except (MemoryError, RecursionError):  # what CPython's parser raises past its own nesting limit
        raise FormulaError(f"calculate_output is nested too deep; at most {MAX_DEPTH} levels") from None
    _check_depth(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.operator, ast.USub, ast.UAdd)):
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            if not math.isfinite(node.value):
                raise FormulaError(f"calculate_output: '{ast.get_source_segment(text.strip(), node)}' is not a finite "
                                   "number")
            continue
        if isinstance(node, ast.Name):
            if node.id not in names and node.id not in FUNCTIONS:
                raise FormulaError(f"calculate_output names '{node.id}', which is not one of the graders "
                                   f"({', '.join(sorted(names))})")
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS \
                and not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args):
            low, high = ARITY.get(node.func.id, (1, 1))
            if not low <= len(node.args) <= high:
                takes = f"{low}" if low == high else f"{low} to {high}"
                raise FormulaError(f"calculate_output: {node.func.id}() takes {takes} argument(s), got {len(node.args)}")
            continue
        snippet = ast.get_source_segment(text.strip(), node) or type(node).__name__
        raise FormulaError(f"calculate_output: '{snippet}' is not allowed; use numbers, grader names, "
                           f"+ - * / ^ and {', '.join(FUNCTIONS)}")
    return tree


def _check_depth(tree: ast.AST) -> None:
    stack = [(tree, 1)]  # iterative, so that the check itself cannot recurse too deep
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FormulaError(f"calculate_output is nested too deep; at most {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def evaluate(text: str, values: dict[str, float]) -> float:
    """The formula's value with each grader name bound to its score; a ValueError when it is
    not a finite number (an OverflowError when a step overflows)."""
    value = _eval(parse_formula(text, frozenset(values)).body, values)
    if not math.isfinite(value):
        raise ValueError(f"the formula's value is {value}, not a finite number")
    return value


def _eval(node: ast.AST, values: dict[str, float]) -> float:
    # Every value is a float: exact integers would let ((9^999)^999)^999 compute a number of a
    # billion digits, where a float overflows (OverflowError) at once.
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, values)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, values), _eval(node.right, values)
        if isinstance(node.op, ast.Pow) and abs(right) > 1000:  # no huge powers of a number
            raise FormulaError(f"calculate_output: an exponent of {right} is too large")
        value = BINARY[type(node.op)](left, right)
        if isinstance(value, complex):  # a negative number to a fractional power
            raise ValueError(f"calculate_output: {left:g} ^ {right:g} is not a real number")
        return float(value)
    if isinstance(node, ast.Call):
        return float(FUNCTIONS[node.func.id](*(_eval(a, values) for a in node.args)))  # type: ignore[attr-defined]
    raise FormulaError(f"calculate_output: {type(node).__name__} is not allowed")
