"""The grader objects, field for field as OpenAI's graders API has them, as pydantic models
that reject unknown keys; `parse_grader` turns a JSON object into one, or a `GraderError`
naming the field (`grader.operation`, `grader.graders.label.reference`).

Where OpenAI's shapes leave room:
- `text_similarity` takes `pass_threshold` (as the evals API's does; optional here);
- `multi.graders` is a map of name -> grader, as OpenAI's guide writes it; the SDK's single
  grader object is also taken, under its own name;
- message content is text: a string, `input_text` or `output_text` parts (no images or audio);
- bounds OpenAI leaves unsaid: a multi holds at most MAX_GRADERS graders, a label_model at most
  MAX_LABELS labels (OpenAI's structured outputs take 1,000 enum values), numbers are finite.

    python -c "from tunesmith.graders.types import parse_grader; print(parse_grader({'type': 'string_check', \
'name': 'n', 'input': 'a', 'reference': 'a', 'operation': 'eq'}))"
"""

from __future__ import annotations

import reprlib
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunesmith.errors import UsageError

GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
MAX_GRADERS = 32
"""Graders in one multi: each may be a process (python) or a model call (judges) per sample."""
MAX_LABELS = 1000
"""Labels of a label_model: they become the judge's JSON schema enum (OpenAI's limit: 1,000 values)."""
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
                      "rouge_5", "rouge_l")


class GraderError(UsageError):
    """A grader that does not validate; `param` names the field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str = "grader"):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    # NaN and Infinity parse (Python's json takes them) but no grader can use them, and a
    # grader is echoed back and stored with jobs, where JSON writes them as null.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # JSON's "\ud800" escape decodes to a string no judge's request can encode.
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("holds a lone surrogate (an unpaired \\ud800-\\udfff escape); send valid "
                                     "Unicode") from None
        return value


class StringCheckGrader(_Strict):
    """Compares `input` with `reference`: eq, ne, like (contains), ilike (contains, any case)."""

    input: str = Field(description="The text checked; may hold templates such as {{sample.output_text}}.")
    name: str = Field(description="The grader's name.")
    operation: Literal["eq", "ne", "like", "ilike"] = Field(description="eq, ne, like or ilike.")
    reference: str = Field(description="The text compared against; may hold templates such as {{item.label}}.")
    type: Literal["string_check"]


class TextSimilarityGrader(_Strict):
    """Scores `input` against `reference` with a text similarity metric, from 0 to 1."""

    evaluation_metric: Literal[SIMILARITY_METRICS] = Field(  # type: ignore[valid-type]
        description="fuzzy_match, bleu, gleu, meteor, rouge_1 .. rouge_5 or rouge_l.")
    input: str = Field(description="The text graded; may hold templates.")
    name: str = Field(description="The grader's name.")
    reference: str = Field(description="The text graded against; may hold templates.")
    type: Literal["text_similarity"]
    pass_threshold: float | None = Field(None, description="A score at or above it passes (as in OpenAI's evals).")


class PythonGrader(_Strict):
    """`grade(sample, item) -> float` from `source`, run in a child process with OS limits."""

    name: str = Field(description="The grader's name.")
    source: str = Field(description="Python source defining grade(sample, item) -> float.")
    type: Literal["python"]
    image_tag: str | None = Field(None, description="OpenAI's runtime image; ignored (the local Python runs it).")


class InputText(_Strict):
    text: str
    type: Literal["input_text"]


class OutputText(_Strict):
    text: str
    type: Literal["output_text"]


Part = Annotated[Union[InputText, OutputText], Field(discriminator="type")]


class Message(_Strict):
    content: str | Part | list[str | Part] = Field(description="Text, which may hold templates.")
    role: Literal["user", "assistant", "system", "developer"]
    type: Literal["message"] | None = None

    def text(self) -> str:
        parts = self.content if isinstance(self.content, list) else [self.content]
        return "".join(p if isinstance(p, str) else p.text for p in parts)


class SamplingParams(_Strict):
    max_completions_tokens: int | None = Field(None, ge=1, description="Most tokens the judge may write.")
    reasoning_effort: str | None = Field(None, description="Passed to the judge's endpoint as given.")
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


class ScoreModelGrader(_Strict):
    """A judge model behind an OpenAI-compatible endpoint answers a number within `range`."""

    input: list[Message] = Field(min_length=1, description="The messages the judge reads; may hold templates.")
    model: str = Field(description="The judge model, as the endpoint names it.")
    name: str = Field(description="The grader's name.")
    type: Literal["score_model"]
    range: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high]; default [0, 1].")
    sampling_params: SamplingParams | None = None


class LabelModelGrader(_Strict):
    """A judge model picks one of `labels`; the score is 1 for one of `passing_labels`, else 0."""

    input: list[Message] = Field(min_length=1, description="The messages the judge reads; may hold templates.")
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS, description="The labels the judge picks from.")
    model: str = Field(description="The judge model, as the endpoint names it.")
    name: str = Field(description="The grader's name.")
    passing_labels: list[str] = Field(min_length=1, max_length=MAX_LABELS,
                                      description="The labels that pass; a subset of labels.")
    type: Literal["label_model"]


SingleGrader = Annotated[
    Union[StringCheckGrader, TextSimilarityGrader, PythonGrader, ScoreModelGrader, LabelModelGrader],
    Field(discriminator="type"),
]


class MultiGrader(_Strict):
    """Several graders, combined by the `calculate_output` formula over their names."""

    calculate_output: str = Field(description="A formula over the graders' names, e.g. 0.5 * a + 0.5 * b.")
    graders: dict[str, SingleGrader] = Field(min_length=1, max_length=MAX_GRADERS, description="Name -> grader.")
    name: str = Field(description="The grader's name.")
    type: Literal["multi"]


Grader = Annotated[
    Union[StringCheckGrader, TextSimilarityGrader, PythonGrader, ScoreModelGrader, LabelModelGrader, MultiGrader],
    Field(discriminator="type"),
]


class _Holder(BaseModel):
    grader: Grader


def parse_grader(obj: Any, param: str = "grader") -> Any:
    """The typed grader for a JSON object, or a GraderError naming the first bad field
    (`param` is its prefix) with a sentence for each problem."""
    if isinstance(obj, dict) and obj.get("type") == "multi" and isinstance(obj.get("graders"), dict) \
            and obj["graders"].get("type") in GRADER_TYPES:  # the SDK's shape: one grader, not a map
        inner = obj["graders"]
        obj = {**obj, "graders": {str(inner.get("name", "grader")): inner}}
    if isinstance(obj, dict) and obj.get("type") not in GRADER_TYPES:
        got = obj.get("type")
        raise GraderError(f"{param}.type must be one of {', '.join(GRADER_TYPES)} (got {got!r})", f"{param}.type")
    try:
        return _Holder(grader=obj).grader
    except ValidationError as exc:
        problems: dict[str, str] = {}  # one sentence per field (a union's branches say the same field)
        for err in exc.errors():
            where = _param(param, err["loc"][1:])
            if err["type"] == "extra_forbidden":
                problems.setdefault(where, f"unknown field '{where}'")
            elif err["type"] == "missing":
                problems.setdefault(where, f"missing field '{where}'")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                problems.setdefault(where, f"invalid '{where}': {msg} (got {_SHORT.repr(err.get('input'))})")
        raise GraderError("; ".join(problems.values()), next(iter(problems), param)) from None


_SHORT = reprlib.Repr()  # the received value in a message: bounded in length and depth, whatever was sent
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 60, 60, 4, 4


def _param(prefix: str, loc: tuple) -> str:
    """('string_check', 'operation') -> 'grader.operation': the union's tags dropped."""
    name = prefix
    for part in loc:
        if part in GRADER_TYPES or part in ("str", "input_text", "output_text") or \
                (isinstance(part, str) and not part.isidentifier()):  # pydantic's union branch names
            continue
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name
