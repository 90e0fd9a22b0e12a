"""Request and response bodies of the OpenAI-compatible API, in OpenAI's field order.

Only the fields the server honours are accepted; any other field is a 400 that names it,
rather than a parameter silently ignored.

    python -c "from tunesmith.serve.protocol import ChatCompletionRequest; print(ChatCompletionRequest.model_json_schema())"
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_N = 8
MAX_STOP = 4


def _no_lone_surrogates(v: str) -> str:
    # JSON's "\ud800" escape decodes to a string that is not valid Unicode: no tokenizer
    # takes it and no response naming it can be encoded, so it is refused here, by name.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the string holds a lone surrogate (an unpaired \\ud800-\\udfff escape); send valid Unicode")
    return v


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
"""Every string a client sends: valid Unicode."""


def _json_of_text(value: Any) -> Any:
    """Every string (and key) in a JSON value is valid Unicode; walked without recursion."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            _no_lone_surrogates(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return value


JsonOfText = Annotated[Any, AfterValidator(_json_of_text)]
"""Any JSON a client sends (a dataset row) whose strings are valid Unicode."""
INT64_MAX = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- requests


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(_Strict):
    name: str
    arguments: str
    """The arguments as a JSON string (OpenAI's shape)."""


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[TextPart], None] = None
    name: Optional[Text] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[Text] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


def _check_stop(v: Any) -> Any:
    stops = [v] if isinstance(v, str) else (v or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings are accepted, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return v


def stop_list(stop: Union[str, list[str], None]) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


class ChatCompletionRequest(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    model: Text
    logprobs: Optional[Literal[False]] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate (older name).")
    n: int = Field(1, ge=1, le=MAX_N, description="Completions to generate for the prompt.")
    response_format: Optional[ResponseFormat] = Field(
        None, description='{"type": "json_object"}: one JSON object; {"type": "json_schema", "json_schema": '
                          '{"name", "schema"}}: one value of the schema (structured outputs).')
    seed: Optional[int] = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX,
                                description="Seed for sampling (a 64-bit integer); same seed, same output.")
    stop: Union[Text, list[Text], None] = Field(None, description="Up to 4 strings that end generation.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    tools: Optional[list[Tool]] = Field(None, description="Functions the model may call (JSON Schema parameters).")
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description='"none", "auto" (the default with tools), "required", or {"type": "function", '
                          '"function": {"name"}}.')
    parallel_tool_calls: bool = Field(True, description="Whether an answer may hold several calls.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: Optional[Text] = None
    # vLLM's extensions, sent through the openai client's extra_body.
    guided_regex: Optional[Text] = Field(None, description="The answer matches this regular expression.")
    guided_choice: Optional[list[Text]] = Field(None, description="The answer is one of these strings.")

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, v: Any) -> Any:
        return _check_stop(v)

    def token_limit(self) -> tuple[Optional[int], str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Strict):
    model: Text
    prompt: Union[Text, list[Text]]
    echo: Literal[False] = False
    max_tokens: Optional[int] = Field(16, ge=1, description="Most tokens to generate (OpenAI's default: 16).")
    n: int = Field(1, ge=1, le=MAX_N, description="Completions to generate for each prompt.")
    seed: Optional[int] = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX,
                                description="Seed for sampling (a 64-bit integer); same seed, same output.")
    stop: Union[Text, list[Text], None] = Field(None, description="Up to 4 strings that end generation.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: Optional[Text] = None
    # vLLM's extensions, sent through the openai client's extra_body.
    guided_regex: Optional[Text] = Field(None, description="The answer matches this regular expression.")
    guided_choice: Optional[list[Text]] = Field(None, description="The answer is one of these strings.")

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, v: Any) -> Any:
        return _check_stop(v)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class AdapterRequest(_Strict):
    name: Text
    path: Text


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[FunctionCallDelta] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunesmith"
    parent: Optional[str] = None
    """The base model's id when this model is an adapter."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ----------------------------------------------------------------------------- graders


class GraderValidateRequest(_Strict):
    """POST /v1/fine_tuning/alpha/graders/validate. The grader is read by graders.types, so
    that an error names its field as `grader.<field>`."""

    grader: dict[str, Any]


class GraderRunRequest(_Strict):
    """POST /v1/fine_tuning/alpha/graders/run."""

    grader: dict[str, Any]
    model_sample: Text = Field(description="The answer graded: sample.output_text, and sample.output_json when it is JSON.")
    item: JsonOfText = Field(None, description="The dataset row: the item namespace of templates and python graders.")
