"""score_model and label_model: a judge model behind any OpenAI-compatible endpoint (OpenAI,
vLLM, `tunesmith serve`...), asked through the official `openai` client with structured
outputs, so the answer is JSON that parses: {"result": <number>} for a score,
{"result": <one of the labels>} for a label.

    python -c "from tunesmith.graders.judge import Endpoint; print(Endpoint('http://127.0.0.1:8000/v1'))"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunesmith.graders.templates import render
from tunesmith.graders.types import LabelModelGrader, ScoreModelGrader


@dataclass(frozen=True)
class Endpoint:
    """Where judges are asked: base_url None is the openai client's default ($OPENAI_BASE_URL or OpenAI's)."""

    base_url: str | None = None
    api_key: str | None = None
    """None: the openai client's default ($OPENAI_API_KEY); a local server without a key takes anything."""
    timeout_s: float = 120.0

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or _default_key(), timeout=self.timeout_s,
                             max_retries=2)


def _default_key() -> str:
    import os

    # The openai client refuses to start without a key; a local judge needs none.
    return os.environ.get("OPENAI_API_KEY") or "unused"


@dataclass
class JudgeAnswer:
    score: float | None
    """None: the answer is not a usable score or label (`problem` says why)."""
    tokens: dict[str, int]
    problem: str | None = None
    refused: bool = False


def score_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {"result": {"type": "number"}}, "required": ["result"],
            "additionalProperties": False}


def label_schema(labels: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": {"result": {"type": "string", "enum": labels}}, "required": ["result"],
            "additionalProperties": False}


def ask_judge(client: Any, grader: ScoreModelGrader | LabelModelGrader, sample: dict[str, Any],
              item: Any) -> JudgeAnswer:
    """The judge's score (score_model: within `range`; label_model: 1 for a passing label, else
    0) and its token usage, or what is wrong with its answer. Raises TemplateError or the openai
    client's errors (the endpoint failed)."""
    messages = [{"role": m.role, "content": render(m.text(), sample, item)} for m in grader.input]
    if isinstance(grader, ScoreModelGrader):
        schema, kwargs = score_schema(), _sampling(grader)
    else:
        # label_model has no sampling_params: asked greedily, the same answer gives the same label.
        schema, kwargs = label_schema(grader.labels), {"temperature": 0}
    response = client.chat.completions.create(
        model=grader.model, messages=messages,
        response_format={"type": "json_schema", "json_schema": {"name": "grade", "schema": schema, "strict": True}},
        **kwargs,
    )
    usage = response.usage
    tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
              "total_tokens": usage.total_tokens} if usage else {}
    message = response.choices[0].message
    if getattr(message, "refusal", None):
        return JudgeAnswer(None, tokens, f"the judge refused: {message.refusal}", refused=True)
    try:
        result = json.loads(message.content or "")["result"]
    except (ValueError, KeyError, TypeError):
        return JudgeAnswer(None, tokens, f"the judge's answer is not {{\"result\": ...}}: {(message.content or '')[:200]!r}")
    if isinstance(grader, LabelModelGrader):
        if result not in grader.labels:
            return JudgeAnswer(None, tokens, f"the judge's label {result!r} is not one of {grader.labels}")
        return JudgeAnswer(float(result in grader.passing_labels), tokens)
    low, high = grader.range or [0.0, 1.0]
    if isinstance(result, bool) or not isinstance(result, (int, float)) or not low <= result <= high:
        return JudgeAnswer(None, tokens, f"the judge's score {result!r} is not a number in [{low:g}, {high:g}]")
    return JudgeAnswer(float(result), tokens)


def _sampling(grader: ScoreModelGrader) -> dict[str, Any]:
    params = grader.sampling_params
    if params is None:
        return {}
    kwargs = {"temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
              "max_completion_tokens": params.max_completions_tokens, "reasoning_effort": params.reasoning_effort}
    return {k: v for k, v in kwargs.items() if v is not None}
