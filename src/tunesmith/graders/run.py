"""Validate a grader and run it on samples, with OpenAI's result shape.

`validate_grader(grader)` raises a `GraderError` naming the field for what can never run
(a template outside item/sample, a formula naming no grader, source that does not compile,
passing labels that are not labels). `Grading(grader, endpoint, limits)` runs it on many
samples, keeping the python grader's child and the judge's client between them; each
`run(output_text, item)` returns a `GradeResult`. A sample the grader cannot score (a
missing field, a python grader that raises or hangs, a judge that answers nonsense) scores 0
with the reason in `errors`; it never raises.

    python -c "from tunesmith.graders.run import Grading; from tunesmith.graders.types import parse_grader; \
g = Grading(parse_grader({'type': 'text_similarity', 'name': 's', 'input': '{{sample.output_text}}', \
'reference': '{{item.ref}}', 'evaluation_metric': 'rouge_l'})); print(g.run('the cat', {'ref': 'a cat'}).to_openai())"
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass, field
from typing import Any

from tunesmith.graders.formula import FormulaError, evaluate, parse_formula
from tunesmith.graders.judge import Endpoint, ask_judge
from tunesmith.graders.python_sandbox import PythonLimits, PythonSandbox
from tunesmith.graders.similarity import TextTooLong, similarity
from tunesmith.graders.templates import TemplateError, build_sample, check_template, render
from tunesmith.graders.types import (
    GraderError, LabelModelGrader, MultiGrader, PythonGrader, ScoreModelGrader, StringCheckGrader,
    TextSimilarityGrader,
)

ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error",
               "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
               "truncated_observation_error", "unresponsive_reward_error")
"""OpenAI's grader error flags, in its order; each has its details field where OpenAI has one."""


def validate_grader(grader: Any, param: str = "grader", limits: PythonLimits = PythonLimits()) -> None:
    """Raise a GraderError naming the field of the first thing that can never run."""
    if isinstance(grader, MultiGrader):
        try:
            parse_formula(grader.calculate_output, frozenset(grader.graders))
        except FormulaError as exc:
            raise GraderError(f"{param}.{exc}", f"{param}.calculate_output") from None  # exc starts "calculate_output"
        for name, sub in grader.graders.items():
            validate_grader(sub, f"{param}.graders.{name}", limits)
        return
    texts: list[tuple[str, str]] = []
    if isinstance(grader, (StringCheckGrader, TextSimilarityGrader)):
        texts = [("input", grader.input), ("reference", grader.reference)]
    elif isinstance(grader, (ScoreModelGrader, LabelModelGrader)):
        texts = [(f"input[{i}].content", m.text()) for i, m in enumerate(grader.input)]
    for where, text in texts:
        problem = check_template(text)
        if problem:
            raise GraderError(f"{param}.{where}: {problem}", f"{param}.{where}")
    if isinstance(grader, PythonGrader):
        _check_source(grader.source, f"{param}.source", limits)
    if isinstance(grader, ScoreModelGrader) and grader.range and not grader.range[0] < grader.range[1]:
        raise GraderError(f"{param}.range must be [low, high] with low < high (got {grader.range})", f"{param}.range")
    if isinstance(grader, LabelModelGrader):
        labels = set(grader.labels)  # a set: two lists of 1,000 compared pairwise are a million steps
        extra = [label for label in grader.passing_labels if label not in labels]
        if extra:
            raise GraderError(f"{param}.passing_labels must be among labels; {extra} are not", f"{param}.passing_labels")


def _check_source(source: str, param: str, limits: PythonLimits) -> None:
    size = len(source.encode())
    if size > limits.max_source_bytes:
        raise GraderError(f"{param} is {size} bytes; at most {limits.max_source_bytes}", param)
    try:
        tree = ast.parse(source)  # parsing runs nothing
    except SyntaxError as exc:
        raise GraderError(f"{param} does not compile: {exc.msg} (line {exc.lineno})", param) from None
    except (MemoryError, RecursionError, ValueError) as exc:  # past the parser's nesting limits; a NUL byte
        why = str(exc) if isinstance(exc, ValueError) else "it is nested too deep for Python's parser"
        raise GraderError(f"{param} does not compile: {why}", param) from None
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "grade" for n in tree.body):
        raise GraderError(f"{param} must define grade(sample, item) -> float at its top level", param)


@dataclass
class GradeResult:
    """One sample's grade, as OpenAI's graders.run answers it (`to_openai`)."""

    name: str
    type: str
    reward: float
    errors: dict[str, Any] = field(default_factory=dict)
    """The error flags that are set, with their details (empty: graded cleanly)."""
    sub_rewards: dict[str, float] = field(default_factory=dict)
    token_usage: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per judge model: prompt, completion and total tokens."""
    execution_time: float = 0.0
    passed: bool | None = None
    """Against text_similarity's pass_threshold, when it has one."""

    @property
    def error(self) -> bool:
        return bool(self.errors)

    def to_openai(self) -> dict[str, Any]:
        flags: dict[str, Any] = {}
        for flag in ERROR_FLAGS:
            flags[flag] = bool(self.errors.get(flag))
            if flag == "model_grader_server_error":
                flags["model_grader_server_error_details"] = self.errors.get("model_grader_server_error_details")
            elif flag == "python_grader_runtime_error":
                flags["python_grader_runtime_error_details"] = self.errors.get("python_grader_runtime_error_details")
            elif flag == "python_grader_server_error":
                flags["python_grader_server_error_type"] = self.errors.get("python_grader_server_error_type")
        tokens = sum(u.get("total_tokens", 0) for u in self.token_usage.values())
        return {
            "reward": self.reward,
            "metadata": {
                "name": self.name, "type": self.type, "errors": flags, "execution_time": self.execution_time,
                "scores": {self.name: self.reward, **self.sub_rewards}, "token_usage": tokens or None,
                "sampled_model_name": None,
            },
            "sub_rewards": dict(self.sub_rewards),
            "model_grader_token_usage_per_model": dict(self.token_usage),
        }

    def error_text(self) -> str:
        """One line saying what went wrong, for logs and the CLI."""
        details = [str(v) for k, v in self.errors.items() if not isinstance(v, bool) and v]
        return "; ".join(details) or ", ".join(self.errors)


class Grading:
    """One grader, ready to grade many samples (call `close`, or use it in a `with`)."""

    def __init__(self, grader: Any, endpoint: Endpoint = Endpoint(), limits: PythonLimits = PythonLimits(),
                 sample_budget_s: float | None = None):
        validate_grader(grader, limits=limits)
        self.grader, self.endpoint, self.limits = grader, endpoint, limits
        self.sample_budget_s = sample_budget_s
        """Wall-clock time for all of one sample's python graders together (None: each has the
        limits' timeout): a multi of 32 graders that spin would otherwise hold 64 minutes."""
        self._sandboxes: dict[str, PythonSandbox] = {}
        self._client: Any = None
        self._deadline: float | None = None

    def run(self, output_text: str, item: Any) -> GradeResult:
        """Grade one answer against its dataset row."""
        started = time.perf_counter()
        self._deadline = None if self.sample_budget_s is None else time.monotonic() + self.sample_budget_s
        sample = build_sample(output_text)
        result = GradeResult(self.grader.name, self.grader.type, 0.0)
        if isinstance(self.grader, MultiGrader):
            scores = {}
            for key, sub in self.grader.graders.items():
                scores[key] = self._score(sub, key, sample, item, result)
            result.sub_rewards = scores
            try:
                result.reward = evaluate(self.grader.calculate_output, scores)
            except (ArithmeticError, ValueError, FormulaError) as exc:  # e.g. a division by a zero score
                result.errors["formula_parse_error"] = True
                result.errors["formula_details"] = f"calculate_output: {exc}"
        else:
            result.reward = self._score(self.grader, self.grader.name, sample, item, result)
            threshold = getattr(self.grader, "pass_threshold", None)
            if threshold is not None:
                result.passed = result.reward >= threshold
        result.execution_time = time.perf_counter() - started
        return result

    def _score(self, grader: Any, key: str, sample: dict[str, Any], item: Any, result: GradeResult) -> float:
        """One grader's score; 0 with the reason recorded in `result.errors` when it cannot score."""
        try:
            if isinstance(grader, StringCheckGrader):
                return _string_check(grader.operation, render(grader.input, sample, item),
                                     render(grader.reference, sample, item))
            if isinstance(grader, TextSimilarityGrader):
                return similarity(grader.evaluation_metric, render(grader.input, sample, item),
                                  render(grader.reference, sample, item))
            if isinstance(grader, PythonGrader):
                return self._python(grader, key, sample, item, result)
            return self._judge(grader, sample, item, result)
        except TemplateError as exc:
            result.errors["invalid_variable_error"] = True
            result.errors["invalid_variable_details"] = f"{key}: {exc}"
        except TextTooLong as exc:
            result.errors["other_error"] = True
            result.errors["other_error_details"] = f"{key}: {exc}"
        return 0.0

    def _python(self, grader: PythonGrader, key: str, sample: dict[str, Any], item: Any, result: GradeResult) -> float:
        timeout_s = self.limits.timeout_s
        if self._deadline is not None:
            timeout_s = min(timeout_s, self._deadline - time.monotonic())
            if timeout_s <= 0:
                result.errors["unresponsive_reward_error"] = True
                result.errors["unresponsive_reward_details"] = (f"{key}: not run; the sample's graders used their "
                                                                f"{self.sample_budget_s:g} s")
                return 0.0
        sandbox = self._sandboxes.get(key)
        if sandbox is None:
            sandbox = self._sandboxes[key] = PythonSandbox(grader.source, self.limits)
        outcome = sandbox.grade(sample, item, timeout_s)
        if outcome.score is not None:
            return outcome.score
        if outcome.setup_error:
            result.errors["python_grader_server_error"] = True
            result.errors["python_grader_server_error_type"] = f"{key}: {outcome.error}"
        else:
            result.errors["python_grader_runtime_error"] = True
            result.errors["python_grader_runtime_error_details"] = f"{key}: {outcome.error}"
        return 0.0

    def _judge(self, grader: ScoreModelGrader | LabelModelGrader, sample: dict[str, Any], item: Any,
               result: GradeResult) -> float:
        import openai

        if self._client is None:
            self._client = self.endpoint.client()
        try:
            answer = ask_judge(self._client, grader, sample, item)
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800") in the sample or the row
            result.errors["other_error"] = True
            result.errors["other_error_details"] = f"{grader.name}: the judge's messages are not valid Unicode"
            return 0.0
        except openai.OpenAIError as exc:
            result.errors["model_grader_server_error"] = True
            result.errors["model_grader_server_error_details"] = f"{grader.model}: {type(exc).__name__}: {exc}"[:500]
            return 0.0
        usage = result.token_usage.setdefault(grader.model, {})
        for k, v in answer.tokens.items():
            usage[k] = usage.get(k, 0) + v
        if answer.score is None:
            kind = "model_grader_refusal" if answer.refused else "model_grader_parse"
            result.errors[f"{kind}_error"] = True
            result.errors[f"{kind}_details"] = answer.problem
            return 0.0
        return answer.score

    def close(self) -> None:
        for sandbox in self._sandboxes.values():
            sandbox.close()
        self._sandboxes.clear()
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "Grading":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_grader(grader: Any, output_text: str, item: Any, endpoint: Endpoint = Endpoint(),
               limits: PythonLimits = PythonLimits(), budget_s: float | None = None) -> GradeResult:
    """Grade one answer (a Grading for a single sample; `budget_s` for its python graders together)."""
    with Grading(grader, endpoint, limits, budget_s) as grading:
        return grading.run(output_text, item)


def _string_check(operation: str, text: str, reference: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    return float(reference.lower() in text.lower())  # ilike
