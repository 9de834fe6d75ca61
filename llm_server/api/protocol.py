"""OpenAI chat-completions wire models (requests, responses, stream chunks). Pydantic only."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protos.options import VirMode

# ---- request ------------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... or an http(s) URL")
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="low: one 448x448 tile; auto/high: dynamic tiling"
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


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        has_image = isinstance(self.content, list) and any(
            isinstance(part, ImagePart) for part in self.content
        )
        if has_image and self.role != "user":
            raise ValueError(f"images are only accepted in user messages, not {self.role}")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's fields, plus DvD's extensions (``vir``, ``vir_threshold``, ``max_tiles``,
    ``top_k``, ``min_tokens``, ``return_token_ids``). Unknown fields are ignored; known OpenAI
    features this server does not implement are refused rather than silently dropped."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    # Known OpenAI fields that are not implemented: accepted only at their "off" value.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    # DvD extensions.
    vir: VirMode | None = Field(
        None, description="Visual Resolution Router mode (Flash checkpoints)"
    )
    vir_threshold: float | None = Field(
        None, ge=0, le=1, description="overrides the router's absolute threshold"
    )
    max_tiles: int | None = Field(None, ge=1, description="max tiles per image")
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0, description="tokens generated before EOS may end the answer")
    return_token_ids: bool = Field(False, description="add the generated token ids per choice")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def unsupported_feature(self) -> str | None:
        """Name of a requested OpenAI feature this server does not implement, if any."""
        if self.logprobs or self.top_logprobs:
            return "logprobs"
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            return "tools"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        if self.logit_bias:
            return "logit_bias"
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
    cached_tokens: int = 0
    image_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class VisionSummary(BaseModel):
    """DvD extension: what the vision service did with the request's images."""

    images: int
    tiles: int
    compressed_tiles: int
    image_tokens: int
    # Router mode applied: auto / off / max, or "unavailable" when the checkpoint has no
    # Visual Resolution Router (not InternVL3.5-Flash): then every tile keeps 256 tokens.
    vir: VirMode | Literal["unavailable"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    vision: VisionSummary | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None
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
