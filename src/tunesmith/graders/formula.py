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
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow, ast.Mod: operator.mod}
MAX_LENGTH = 2000


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
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.operator, ast.USub, ast.UAdd)):
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            continue
        if isinstance(node, ast.Name):
            if node.id not in names and node.id not in FUNCTIONS:
                raise FormulaError(f"calculate_output names '{node.id}', which is not one of the graders "
                                   f"({', '.join(sorted(names))})")
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS \
                and not node.keywords and node.args:
            continue
        snippet = ast.get_source_segment(text.strip(), node) or type(node).__name__
        raise FormulaError(f"calculate_output: '{snippet}' is not allowed; use numbers, grader names, "
                           f"+ - * / ^ and {', '.join(FUNCTIONS)}")
    return tree


def evaluate(text: str, values: dict[str, float]) -> float:
    """The formula's value with each grader name bound to its score."""
    return float(_eval(parse_formula(text, frozenset(values)).body, values))


def _eval(node: ast.AST, values: dict[str, float]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, values)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, values), _eval(node.right, values)
        if isinstance(node.op, ast.Pow) and abs(right) > 1000:  # no huge powers of a number
            raise FormulaError(f"calculate_output: an exponent of {right} is too large")
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call):
        return FUNCTIONS[node.func.id](*(_eval(a, values) for a in node.args))  # type: ignore[attr-defined]
    raise FormulaError(f"calculate_output: {type(node).__name__} is not allowed")
