"""OpenAI Responses wire models (``/v1/responses``): requests, response objects and output
items. Pydantic only."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from llm_server.api.protocol import (
    ITEMS_PER_MESSAGE_CAP,
    MESSAGES_CAP,
    TOOLS_CAP,
    VISUAL_TOKENS_CAP,
    VisionSummary,
)
from protos.options import VirMode

METADATA_CAP = 16  # OpenAI's: 16 pairs, keys up to 64 characters, values up to 512
ID_CHARS_CAP = 256

# ---- request: input items ------------------------------------------------------------------


class InputText(BaseModel):
    type: Literal["input_text"]
    text: str


class InputImage(BaseModel):
    type: Literal["input_image"]
    image_url: str | None = Field(None, description="data:image/...;base64,... or an http(s) URL")
    file_id: str | None = Field(None, max_length=ID_CHARS_CAP)
    detail: Literal["auto", "low", "high", "original"] = "auto"
    # DvD extension, as in chat's image_url: most visual tokens this image may take.
    max_visual_tokens: int | None = Field(None, ge=1, le=VISUAL_TOKENS_CAP)


class OutputTextPart(BaseModel):
    """An earlier answer's text, sent back as history."""

    model_config = ConfigDict(extra="ignore")  # annotations, logprobs

    type: Literal["output_text"]
    text: str


class RefusalPart(BaseModel):
    type: Literal["refusal"]
    refusal: str


InputContent = Annotated[
    InputText | InputImage | OutputTextPart | RefusalPart, Field(discriminator="type")
]


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, status of an earlier output message

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[InputContent], Field(max_length=ITEMS_PER_MESSAGE_CAP)]


class FunctionCallItem(BaseModel):
    """A call the model made earlier, sent back as history."""

    model_config = ConfigDict(extra="ignore")  # id, status

    type: Literal["function_call"]
    call_id: str = Field(max_length=ID_CHARS_CAP)
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """The result of a call, for the model to read."""

    model_config = ConfigDict(extra="ignore")  # id, status

    type: Literal["function_call_output"]
    call_id: str = Field(max_length=ID_CHARS_CAP)
    output: str | Annotated[list[InputText], Field(max_length=ITEMS_PER_MESSAGE_CAP)]


class ReasoningItem(BaseModel):
    """An earlier answer's reasoning: accepted as history and left out of the prompt, as
    chat templates leave earlier turns' reasoning out."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "message"))  # a bare {role, content} is a message
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


# ---- request: tools and formats --------------------------------------------------------------


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(BaseModel):
    """A built-in OpenAI tool (web search, file search, ...): refused by name."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(max_length=64)


class NamedFunctionChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = Field(max_length=64)  # "function"; other kinds are refused by name
    name: str | None = None


class TextFormatPlain(BaseModel):
    type: Literal["text"]


class TextFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field("response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # verbosity

    format: (
        Annotated[
            TextFormatPlain | TextFormatJSONObject | TextFormatJSONSchema,
            Field(discriminator="type"),
        ]
        | None
    ) = None


class ResponsesRequest(BaseModel):
    """OpenAI's fields, plus DvD's extensions as in chat (``vir``, ``vir_threshold``,
    ``max_tiles``, ``max_visual_tokens``, ``top_k``, ``min_tokens``, ``seed``). Unknown fields
    are ignored; known OpenAI features this server does not implement are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MESSAGES_CAP)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    tools: list[FunctionTool | OtherTool] | None = Field(None, max_length=TOOLS_CAP)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, max_length=ID_CHARS_CAP)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | (
        None
    ) = Field(None, max_length=METADATA_CAP)
    user: str | None = None
    # Known OpenAI fields this server does not implement: refused when present (their "off"
    # value aside).
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    include: list[str] | None = Field(None, max_length=64)
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # DvD extensions (as in chat).
    vir: VirMode | None = None
    vir_threshold: float | None = Field(None, ge=0, le=1)
    max_tiles: int | None = Field(None, ge=1)
    max_visual_tokens: int | None = Field(None, ge=1, le=VISUAL_TOKENS_CAP)
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)

    def unsupported_feature(self) -> str | None:
        """Name of a requested OpenAI field this server does not implement, if any."""
        if self.background:
            return "background"
        if self.conversation is not None:
            return "conversation"
        if self.prompt is not None:
            return "prompt"
        if self.include:
            return "include"
        if self.truncation == "auto":
            return "truncation"
        if self.reasoning and any(value is not None for value in self.reasoning.values()):
            return "reasoning"
        if self.top_logprobs:
            return "top_logprobs"
        return None


# ---- response --------------------------------------------------------------------------------


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: item_id("msg"))
    status: ItemStatus = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionToolCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: item_id("fc"))
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "completed"


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningOutput(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str = Field(default_factory=lambda: item_id("rs"))
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: ItemStatus = "completed"


OutputItem = OutputMessage | FunctionToolCall | ReasoningOutput


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    image_tokens: int = 0  # DvD extension: the images' visual tokens


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "failed", "in_progress", "incomplete"] = "in_progress"
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    store: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    usage: ResponseUsage | None = None
    vision: VisionSummary | None = None  # DvD extension, as in chat

    def wire(self) -> dict[str, Any]:
        # OpenAI sends these even when null.
        data = self.model_dump(exclude_none=True)
        for key in (
            "error",
            "incomplete_details",
            "instructions",
            "max_output_tokens",
            "previous_response_id",
            "temperature",
            "top_p",
            "usage",
        ):
            data.setdefault(key, None)
        return data
