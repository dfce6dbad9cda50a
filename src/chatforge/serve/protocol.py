"""The OpenAI API as pydantic models: the one owner of the wire format.

Fields are ordered as in OpenAI's API reference (required first, then alphabetical, as the
official SDK's `create()` lists them) and keep OpenAI's names, defaults and ranges. Parameters
chatforge accepts but cannot honour (tools, logit_bias, JSON response formats, ...) are declared
so the error names them ("not supported") instead of calling them unknown; arguments OpenAI does
not define are refused, as OpenAI refuses them. Fields that are not OpenAI's are described as
"extension: ..." so the OpenAPI schema shows them (with vLLM's names where one exists).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_STOP_CHARS = 256  # characters per stop sequence (engine.MAX_STOP_CHARS; the hold-back is linear in it)


class _Request(BaseModel):
    # Unknown arguments are a 400, as with OpenAI ("Unrecognized request argument supplied").
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    pass


# ---- errors -------------------------------------------------------------------------------
class ErrorDetail(_Response):
    message: str
    type: str  # invalid_request_error | authentication_error | rate_limit_error | insufficient_quota | server_error
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


class APIError(Exception):
    """Raised anywhere in the server; answered as an ErrorResponse with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


# ---- chat completions: request ------------------------------------------------------------
class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One turn. `developer` is OpenAI's newer name for `system` and is rendered as system."""

    content: str | list[TextContentPart] | None
    role: Literal["system", "developer", "user", "assistant"]
    name: str | None = None  # accepted and ignored: the chat template has no participant names


class StreamOptions(_Request):
    include_obfuscation: bool | None = None  # accepted; chatforge never pads chunks
    include_usage: bool | None = None


class ResponseFormat(_Request):
    model_config = ConfigDict(extra="allow")  # json_schema payloads; only "text" is supported
    type: Literal["text", "json_object", "json_schema"]


_StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = _StopString | Annotated[list[_StopString], Field(max_length=MAX_STOP)] | None
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# extensions (vLLM's names), marked in the OpenAPI schema by their descriptions
TopK = Annotated[int | None, Field(ge=0, description="extension: sample from the k most likely tokens (0 = all)")]
RepetitionPenalty = Annotated[float | None, Field(ge=0.01, le=100, description="extension: CTRL-style penalty (>1 discourages repeats)")]
IgnoreEos = Annotated[bool | None, Field(description="extension: do not stop at end-of-turn/end-of-text tokens (benchmarks)")]


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, int] | None = None  # not supported: must be empty
    logprobs: bool | None = False
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    metadata: dict[str, str] | None = None  # accepted; not stored
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    parallel_tool_calls: bool | None = None  # accepted; there are no tools
    presence_penalty: Penalty | None = 0.0
    response_format: ResponseFormat | None = None  # only {"type": "text"}
    seed: Seed | None = None
    service_tier: str | None = None  # accepted and ignored
    stop: Stop = None
    store: bool | None = None  # false: keep only the usage row, not the conversation (chatforge stores by default)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = 1.0
    tool_choice: str | dict | None = None  # only "none"
    tools: list[dict] | None = None  # not supported: must be empty
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    top_p: TopP | None = 1.0
    user: Annotated[str, Field(max_length=256)] | None = None
    top_k: TopK = None
    repetition_penalty: RepetitionPenalty = None
    ignore_eos: IgnoreEos = None


# ---- chat completions: response -----------------------------------------------------------
class TopLogprob(_Response):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(_Response):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionUsage(_Response):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int


class ChatCompletionMessage(_Response):
    content: str | None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"


class ChatChoice(_Response):
    finish_reason: Literal["stop", "length"]
    index: int
    logprobs: ChoiceLogprobs | None = None
    message: ChatCompletionMessage


class _CompletionObject(_Response):
    """What OpenAI's completion objects share; each one narrows `choices`, `object` and `usage`
    (a field redeclared in a subclass keeps its place, so the order stays OpenAI's)."""

    id: str
    choices: list
    created: int
    model: str
    object: str
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class ChatCompletion(_CompletionObject):
    choices: list[ChatChoice]
    object: Literal["chat.completion"] = "chat.completion"
    usage: CompletionUsage


class ChoiceDelta(_Response):
    content: str | None = None
    refusal: str | None = None
    role: Literal["assistant"] | None = None


class ChunkChoice(_Response):
    delta: ChoiceDelta
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_CompletionObject):
    choices: list[ChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: CompletionUsage | None = None  # only on the last chunk, with stream_options.include_usage


# ---- (legacy) completions -------------------------------------------------------------------
Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Request):
    model: str
    prompt: Prompt
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None  # only best_of == n (no server-side reranking)
    echo: bool | None = False
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, int] | None = None  # not supported: must be empty
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    presence_penalty: Penalty | None = 0.0
    seed: Seed | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None  # not supported (no fill-in-the-middle)
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    user: Annotated[str, Field(max_length=256)] | None = None
    top_k: TopK = None
    repetition_penalty: RepetitionPenalty = None
    ignore_eos: IgnoreEos = None
    store: Annotated[bool | None, Field(description="extension: false keeps only the usage row, not the prompt and output")] = None


class CompletionLogprobs(_Response):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float]] | None


class CompletionChoice(_Response):
    finish_reason: Literal["stop", "length"] | None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class Completion(_CompletionObject):
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    usage: CompletionUsage | None = None  # always set, except on stream chunks before the last


# ---- models ---------------------------------------------------------------------------------
class Model(_Response):
    id: str  # name@snapshot: pins the exact weights
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "chatforge"
    # extensions
    root: Annotated[str, Field(description="extension: the name without the snapshot (also accepted as a model id)")]
    max_model_len: Annotated[int, Field(description="extension: context window in tokens")]


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[Model]


class Health(_Response):
    """GET /health (extension): liveness; the models and the engines' load only for an admin key."""

    status: Literal["ok"] = "ok"
    models: list[str] | None = None
    queue_depth: int | None = None
    active_slots: int | None = None
