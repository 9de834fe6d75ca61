"""OpenAI chat-completions wire models (requests, responses, stream chunks). Pydantic only."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from protos.options import VirMode

# ---- request ------------------------------------------------------------------------------

# Hard caps on the request's lists, enforced while the body is validated: pydantic stops at
# the first item past a cap, so no list costs more to validate than its cap. The service's
# own limits (settings, checked right after parsing by ``llm_server.api.limits``) are tighter
# and may be raised up to these.
MESSAGES_CAP = 65_536
ITEMS_PER_MESSAGE_CAP = 4_096  # content parts, tool calls
TOOLS_CAP = 4_096
STOP_SEQUENCES_CAP = 1_024
LOGIT_BIAS_CAP = 262_144  # above the largest vocabularies
VISUAL_TOKENS_CAP = 2**32 - 1  # max_visual_tokens travels as a uint32


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... or an http(s) URL")
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="low: one 448x448 tile; auto/high: dynamic tiling"
    )
    max_visual_tokens: int | None = Field(
        None,
        ge=1,
        le=VISUAL_TOKENS_CAP,
        description="DvD extension: most visual tokens this image may take (its tiles are "
        "compressed in decreasing router score until it fits)",
    )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _accept_bare_url(cls, value: Any) -> Any:
        # Several OpenAI-compatible clients send the URL as a plain string.
        return {"url": value} if isinstance(value, str) else value


class VideoURL(BaseModel):
    url: str = Field(description="data:video/...;base64,... or an http(s) URL")


class VideoPart(BaseModel):
    """A video: ``num_frames`` frames sampled from it, one 448x448 tile each."""

    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _accept_bare_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value


VisualPart = ImagePart | VideoPart
ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object, in a string")


class ToolCall(BaseModel):
    """A call the assistant made, in a response or in the history of a request."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=ITEMS_PER_MESSAGE_CAP)] | None = (
        None
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(
        None, max_length=ITEMS_PER_MESSAGE_CAP, description="assistant messages only"
    )
    tool_call_id: str | None = Field(None, description="tool messages: the call answered")

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.content is None and not self.tool_calls and self.role == "assistant":
            raise ValueError("an assistant message needs content or tool_calls")
        has_image = isinstance(self.content, list) and any(
            isinstance(part, ImagePart) for part in self.content
        )
        if has_image and self.role != "user":
            raise ValueError(f"images are only accepted in user messages, not {self.role}")
        has_video = isinstance(self.content, list) and any(
            isinstance(part, VideoPart) for part in self.content
        )
        if has_video and self.role != "user":
            raise ValueError(f"videos are only accepted in user messages, not {self.role}")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls are only accepted in assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self


# ---- structured outputs and tools ---------------------------------------------------------


class TextFormat(BaseModel):
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    type: Literal["json_object"]


class JSONSchemaSpec(BaseModel):
    name: str = Field("response", max_length=64)
    description: str | None = None
    # ``schema`` would shadow a BaseModel attribute; the wire name stays "schema".
    json_schema: dict[str, Any] = Field(
        default_factory=dict, alias="schema", description="a JSON Schema (draft 2020-12)"
    )
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class JSONSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")
]


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments")
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's fields, plus DvD's extensions (``vir``, ``vir_threshold``, ``max_tiles``,
    ``num_frames``, ``max_visual_tokens``, ``top_k``, ``min_tokens``, ``return_token_ids``).
    Unknown fields are ignored; known OpenAI features this server does not implement are
    refused rather than silently dropped."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MESSAGES_CAP)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=STOP_SEQUENCES_CAP)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None,
        max_length=LOGIT_BIAS_CAP,
        description="token id (as a string) -> bias added to its logit",
    )
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=TOOLS_CAP)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Known OpenAI fields this server does not implement: refused when present (their "off"
    # value aside) rather than silently dropped.
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    # DvD extensions.
    vir: VirMode | None = Field(
        None, description="Visual Resolution Router mode (Flash checkpoints)"
    )
    vir_threshold: float | None = Field(
        None, ge=0, le=1, description="overrides the router's absolute threshold"
    )
    max_tiles: int | None = Field(None, ge=1, description="max tiles per image")
    num_frames: int | None = Field(
        None, ge=1, description="frames sampled per video (default: the server's)"
    )
    max_visual_tokens: int | None = Field(
        None,
        ge=1,
        le=VISUAL_TOKENS_CAP,
        description="most visual tokens all images and video frames of the request may take "
        "together (Flash checkpoints compress tiles in decreasing router score until they fit)",
    )
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0, description="tokens generated before EOS may end the answer")
    return_token_ids: bool = Field(False, description="add the generated token ids per choice")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        # How many, and how long: the service's limits (llm_server.api.limits).
        stops = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def unsupported_feature(self) -> str | None:
        """Name of a requested OpenAI field this server does not implement, if any."""
        if self.functions or self.function_call is not None:
            return "functions" if self.functions else "function_call"
        if self.audio is not None:
            return "audio"
        if self.modalities is not None and set(self.modalities) - {"text"}:
            return "modalities"
        if self.prediction is not None:
            return "prediction"
        if self.web_search_options is not None:
            return "web_search_options"
        return None

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- response -----------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class PromptTokensDetails(BaseModel):
    # Prompt tokens whose KV blocks vLLM's prefix cache already held (not computed again).
    cached_tokens: int = 0
    image_tokens: int = 0  # the images' visual tokens
    video_tokens: int = 0  # the videos' visual tokens (their frames')


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class VisionSummary(BaseModel):
    """DvD extension: what the vision service did with the request's images and videos.
    The video fields are absent when the request has no video."""

    images: int
    # Images whose rows the vision service served from its embedding cache (not encoded).
    cached_images: int = 0
    tiles: int  # the images' tiles
    compressed_tiles: int
    image_tokens: int
    videos: int | None = None
    frames: int | None = None  # sampled, one tile each
    compressed_frames: int | None = None
    video_tokens: int | None = None
    # Router mode applied: auto / off / max, or "unavailable" when the checkpoint has no
    # Visual Resolution Router (not InternVL3.5-Flash): then every tile keeps 256 tokens.
    vir: VirMode | Literal["unavailable"]
    # The request's visual-token budget, when it set one: image_tokens + video_tokens fit it
    # (unless vir is max, which ignores it).
    max_visual_tokens: int | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None

    @model_serializer(mode="wrap")
    def _keep_content(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends "content" even when it is null; exclude_none must not drop it.
        data: dict[str, Any] = handler(self)
        data.setdefault("content", None)
        return data


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # vLLM's extension: the model's reasoning (GPT-OSS's analysis channel), apart from content.
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _keep_content(self, handler: Any) -> dict[str, Any]:
        # A message that only calls tools has "content": null, as OpenAI sends it.
        data: dict[str, Any] = handler(self)
        data.setdefault("content", None)
        return data


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    vision: VisionSummary | None = None

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a tool call in a stream: the first piece of a call carries its id, type
    and name; later pieces append to its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    vision: VisionSummary | None = None


# ---- models and errors --------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dvd"
    max_model_len: int
    backbone: str  # the language model's family, e.g. "qwen3", "qwen3_moe", "gpt_oss"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
