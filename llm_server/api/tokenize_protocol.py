"""``/tokenize`` and ``/detokenize`` wire models, in vLLM's shapes. Pydantic only.

A tokenize request is a chat (``messages``: DvD's chat messages, images and videos included)
or a text (``prompt``), as vLLM's ``TokenizeChatRequest`` and ``TokenizeCompletionRequest``;
the response is vLLM's ``TokenizeResponse`` (``count``, ``max_model_len``, ``tokens``,
``token_strs``). DvD's extensions that decide an image's visual tokens (``vir``,
``vir_threshold``, ``max_tiles``, ``num_frames``) are taken as in chat.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from llm_server.api.protocol import (
    MESSAGES_CAP,
    TOOLS_CAP,
    VISUAL_TOKENS_CAP,
    ChatCompletionRequest,
    ChatMessage,
    ToolDefinition,
)
from llm_server.prompt import TemplateOptions
from protos.options import VirMode

# Token ids in a request body: vLLM takes int64 (it checks ids against the vocabulary later).
TOKEN_IDS_CAP = 1 << 20


class TokenizeCompletionRequest(BaseModel):
    """A text to tokenize as a completion prompt (``/v1/completions`` would)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(
        True, description="add the tokenizer's special tokens (e.g. BOS), as completions do"
    )
    return_token_strs: bool | None = Field(False, description="also return the token strings")


class TokenizeChatRequest(BaseModel):
    """Chat messages to tokenize as ``/v1/chat/completions`` would prompt the model: images
    and videos count as the visual tokens the vision service gives them."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MESSAGES_CAP)
    add_generation_prompt: bool = Field(
        True, description="open the assistant's turn after the messages"
    )
    continue_final_message: bool = Field(
        False,
        description="leave the last message open, to be continued (not with add_generation_prompt)",
    )
    add_special_tokens: bool = Field(
        False, description="add the tokenizer's special tokens on top of the chat template's"
    )
    return_token_strs: bool | None = Field(False, description="also return the token strings")
    tools: list[ToolDefinition] | None = Field(None, max_length=TOOLS_CAP)
    # vLLM's, refused: the chat path renders with the checkpoint's template and sends images
    # to the vision service, and /tokenize counts what the chat path would send.
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None
    # DvD's extensions, as in chat: they decide how many visual tokens an image becomes.
    vir: VirMode | None = None
    vir_threshold: float | None = Field(None, ge=0, le=1)
    max_tiles: int | None = Field(None, ge=1)
    num_frames: int | None = Field(None, ge=1)
    max_visual_tokens: int | None = Field(None, ge=1, le=VISUAL_TOKENS_CAP)

    @model_validator(mode="after")
    def _one_open_turn(self) -> TokenizeChatRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        return self

    def unsupported_feature(self) -> str | None:
        """The name of a vLLM field given that this server does not take, if any."""
        for name in ("chat_template", "chat_template_kwargs", "mm_processor_kwargs"):
            if getattr(self, name):
                return name
        return "media_io_kwargs" if self.media_io_kwargs else None

    def template_options(self) -> TemplateOptions:
        return TemplateOptions(
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            add_special_tokens=self.add_special_tokens,
        )

    def chat_request(self, model: str) -> ChatCompletionRequest:
        """The chat completion whose prompt this request tokenizes (served by ``model``)."""
        return ChatCompletionRequest.model_validate(
            {
                "model": self.model or model,
                "messages": self.messages,
                "tools": self.tools,
                "vir": self.vir,
                "vir_threshold": self.vir_threshold,
                "max_tiles": self.max_tiles,
                "num_frames": self.num_frames,
                "max_visual_tokens": self.max_visual_tokens,
            }
        )

    @property
    def has_media(self) -> bool:
        return any(
            part.type != "text"
            for message in self.messages
            if isinstance(message.content, list)
            for part in message.content
        )


def _request_kind(body: Any) -> str:
    if isinstance(body, dict):
        return "chat" if "messages" in body else "text"
    return "chat" if isinstance(body, TokenizeChatRequest) else "text"


# A chat when ``messages`` is there, else a text (vLLM tells them apart by the same fields).
TokenizeRequest = Annotated[
    Annotated[TokenizeChatRequest, Tag("chat")] | Annotated[TokenizeCompletionRequest, Tag("text")],
    Discriminator(_request_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: Annotated[
        list[Annotated[int, Field(ge=0, le=2**63 - 1)]], Field(max_length=TOKEN_IDS_CAP)
    ]


class DetokenizeResponse(BaseModel):
    prompt: str
