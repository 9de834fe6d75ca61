"""Chat messages -> prompt token ids, with one placeholder position per image.

The checkpoint's own chat template renders the conversation. Templates that understand
OpenAI-style content lists render an image part as a marker (the context-image token for
transformers-format InternVL, ``<image>`` for some others); templates that only take strings
get InternVL's convention, ``<image>\\n`` in front of the text. Each marker becomes
``<img><IMG_CONTEXT></img>``; the single ``<IMG_CONTEXT>`` is later widened to the number of
visual tokens the vision service reports for that image.

A video renders as its sampled frames, each an image part after ``Frame{i}: `` (1-based), as
InternVL3.5's reference writes a video prompt: ``Frame1: <image>\nFrame2: <image>\n…``.

Tools, assistant tool calls and ``tool`` results are rendered by the same template, the way
the checkpoint was trained to see them (``tools=`` and ``tool_calls``/``tool_call_id`` in the
messages, as transformers passes them to chat templates).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from checkpoints.spec import ImageTokens
from llm_server.api.protocol import ChatMessage, ImagePart, TextPart, VideoPart
from llm_server.errors import BadRequest

_PROBE_TEXT = "dvd-template-probe"
STRING_IMAGE_MARKER = "<image>"


class ContentFormat(StrEnum):
    OPENAI = "openai"  # the template iterates over content parts
    STRING = "string"  # the template expects plain string content


def frame_label(index: int) -> str:
    """The text before a video's frame ``index`` (0-based) in the prompt."""
    return f"Frame{index + 1}: "


@dataclass(frozen=True)
class TemplateOptions:
    """How a chat is rendered, as vLLM's chat and ``/tokenize`` requests can ask:
    ``add_generation_prompt`` (the assistant's turn opened), ``continue_final_message`` (the
    last message left open, to be continued), ``add_special_tokens`` (the tokenizer's BOS and
    such on top of what the template writes)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False


@dataclass(frozen=True)
class TokenizedPrompt:
    """Prompt token ids with one context-image token per image and per video frame, at
    ``image_positions``."""

    token_ids: list[int]
    image_positions: list[int]


@dataclass(frozen=True)
class ExpandedPrompt:
    """Prompt token ids with each image's placeholder widened to its visual token count."""

    token_ids: list[int]
    is_text: list[bool]  # False where a visual embedding row goes
    image_spans: list[tuple[int, int]]  # [start, end) of each image's rows

    @property
    def num_visual_tokens(self) -> int:
        # Images' and video frames' rows alike: every span is one image's or one frame's.
        return sum(end - start for start, end in self.image_spans)


class PromptBuilder:
    """Renders chats with the checkpoint's template and tokenizes them."""

    def __init__(self, tokenizer: Any, image_tokens: ImageTokens) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        vocab = tokenizer.get_vocab()
        missing = [
            t
            for t in (image_tokens.start, image_tokens.context, image_tokens.end)
            if t not in vocab
        ]
        if missing:
            raise ValueError(f"tokenizer lacks InternVL image tokens {missing}")
        self.context_id = int(vocab[image_tokens.context])
        self.content_format, self.marker = self._detect_template()

    def _render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        options: TemplateOptions = TemplateOptions(),
    ) -> str:
        text = self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
        )
        return str(text)

    def _detect_template(self) -> tuple[ContentFormat, str]:
        probe = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROBE_TEXT}]}
        ]
        try:
            rendered = self._render(probe)
        except Exception:  # template cannot iterate content parts
            return ContentFormat.STRING, STRING_IMAGE_MARKER
        if _PROBE_TEXT in rendered:
            for marker in (self.image_tokens.context, STRING_IMAGE_MARKER):
                if marker in rendered:
                    return ContentFormat.OPENAI, marker
        return ContentFormat.STRING, STRING_IMAGE_MARKER

    def template_messages(
        self, messages: list[ChatMessage], video_frames: Sequence[int] = ()
    ) -> list[dict[str, Any]]:
        """OpenAI messages in the shape the chat template expects; ``video_frames``: the
        frames sampled from each video part, in order."""
        frames = iter(video_frames)
        out: list[dict[str, Any]] = []
        for message in messages:
            role = "system" if message.role == "developer" else message.role
            content: str | list[dict[str, str]] = ""
            if isinstance(message.content, str):
                content = message.content
            elif message.content is not None and role == "tool":
                # Tool results are text; templates render them as one string.
                content = "".join(
                    part.text for part in message.content if isinstance(part, TextPart)
                )
            elif message.content is not None and self.content_format is ContentFormat.OPENAI:
                content = [
                    rendered
                    for part in message.content
                    for rendered in self._template_parts(part, frames)
                ]
            elif message.content is not None:
                content = "".join(
                    part.text
                    if isinstance(part, TextPart)
                    else "".join(f"{label}{self.marker}\n" for label in _labels(part, frames))
                    for part in message.content
                )
            rendered: dict[str, Any] = {"role": role, "content": content}
            if message.tool_calls:
                rendered["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": _arguments(call.function.arguments),
                        },
                    }
                    for call in message.tool_calls
                ]
            if message.tool_call_id is not None:
                rendered["tool_call_id"] = message.tool_call_id
            if message.name is not None and role == "tool":
                rendered["name"] = message.name
            out.append(rendered)
        return out

    def _template_parts(
        self, part: TextPart | ImagePart | VideoPart, frames: Iterator[int]
    ) -> list[dict[str, str]]:
        if isinstance(part, TextPart):
            return [{"type": "text", "text": part.text}]
        rendered: list[dict[str, str]] = []
        for label in _labels(part, frames):
            if label:
                rendered.append({"type": "text", "text": label})
            rendered.append({"type": "image"})
        return rendered

    def tokenize(
        self,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None = None,
        video_frames: Sequence[int] = (),
        options: TemplateOptions = TemplateOptions(),
    ) -> TokenizedPrompt:
        """Token ids of the rendered chat (with ``tools``, OpenAI function definitions, when
        given), one context-image token per image part and per frame of each video part
        (``video_frames``: the frames of each video part, in order), rendered as ``options``
        ask."""
        parts = [
            part
            for message in messages
            if isinstance(message.content, list)
            for part in message.content
        ]
        num_videos = sum(isinstance(part, VideoPart) for part in parts)
        if num_videos != len(video_frames):
            raise ValueError(f"{num_videos} video parts but frame counts for {len(video_frames)}")
        num_images = sum(isinstance(part, ImagePart) for part in parts) + sum(video_frames)
        try:
            text = self._render(self.template_messages(messages, video_frames), tools, options)
        except Exception as exc:  # a template may raise on conversations it does not accept
            raise BadRequest(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from exc
        if text.count(self.marker) != num_images:
            raise BadRequest(
                f"message text must not contain the image placeholder {self.marker!r}",
                param="messages",
            )
        framed = self.image_tokens.start + self.image_tokens.context + self.image_tokens.end
        token_ids = list(
            self.tokenizer.encode(
                text.replace(self.marker, framed), add_special_tokens=options.add_special_tokens
            )
        )
        positions = [i for i, token in enumerate(token_ids) if token == self.context_id]
        if len(positions) != num_images:
            raise BadRequest(
                f"message text must not contain the image token {self.image_tokens.context!r}",
                param="messages",
            )
        return TokenizedPrompt(token_ids, positions)


def _labels(part: ImagePart | VideoPart, frames: Iterator[int]) -> list[str]:
    """The text before each image placeholder of a part: none for an image, ``Frame{i}: ``
    before each frame of a video."""
    if isinstance(part, ImagePart):
        return [""]
    return [frame_label(index) for index in range(next(frames))]


def _arguments(arguments: str) -> Any:
    """A call's arguments as the object they encode: templates write them with ``tojson``
    (a string that is not JSON stays a string)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def expand_prompt(prompt: TokenizedPrompt, visual_token_counts: list[int]) -> ExpandedPrompt:
    """Widen each image's single placeholder to its number of visual tokens."""
    if len(visual_token_counts) != len(prompt.image_positions):
        raise ValueError("one visual token count per image is required")
    token_ids: list[int] = []
    is_text: list[bool] = []
    spans: list[tuple[int, int]] = []
    previous = 0
    for position, count in zip(prompt.image_positions, visual_token_counts, strict=True):
        text_ids = prompt.token_ids[previous:position]
        token_ids.extend(text_ids)
        is_text.extend([True] * len(text_ids))
        start = len(token_ids)
        token_ids.extend([prompt.token_ids[position]] * count)
        is_text.extend([False] * count)
        spans.append((start, start + count))
        previous = position + 1
    tail = prompt.token_ids[previous:]
    token_ids.extend(tail)
    is_text.extend([True] * len(tail))
    return ExpandedPrompt(token_ids, is_text, spans)
