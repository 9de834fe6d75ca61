"""Prompt building: chat template rendering, image placeholders, widening to visual tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from checkpoints.spec import ImageTokens
from llm_server.api.protocol import ChatMessage
from llm_server.errors import BadRequest
from llm_server.prompt import ContentFormat, PromptBuilder, TokenizedPrompt, expand_prompt

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}

# A template that only knows string content, like many original-layout InternVL checkpoints.
STRING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["hf"]))


def user(*parts) -> ChatMessage:
    content = [IMAGE if part is IMAGE else {"type": "text", "text": part} for part in parts]
    return ChatMessage.model_validate({"role": "user", "content": content})


def test_list_template_uses_the_context_token_marker(tokenizer):
    builder = PromptBuilder(tokenizer, ImageTokens())
    assert builder.content_format is ContentFormat.OPENAI
    assert builder.marker == "<IMG_CONTEXT>"
    prompt = builder.tokenize([user(IMAGE, "What is this?", IMAGE)])
    assert len(prompt.image_positions) == 2
    ids = prompt.token_ids
    start, end = tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    for position in prompt.image_positions:
        assert (ids[position - 1], ids[position + 1]) == (start, end)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat is this?")
    assert text.endswith("<|im_start|>assistant\n")


def test_string_template_gets_internvl_image_convention(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = STRING_TEMPLATE
    builder = PromptBuilder(tokenizer, ImageTokens())
    assert builder.content_format is ContentFormat.STRING
    assert builder.marker == "<image>"
    messages = builder.template_messages([user(IMAGE, "Describe.")])
    assert messages == [{"role": "user", "content": "<image>\nDescribe."}]
    prompt = builder.tokenize([user(IMAGE, "Describe.")])
    assert tokenizer.decode(prompt.token_ids).startswith(
        "<|im_start|>user\n<img><IMG_CONTEXT></img>\nDescribe."
    )


def test_developer_role_renders_as_system(tokenizer):
    builder = PromptBuilder(tokenizer, ImageTokens())
    message = ChatMessage(role="developer", content="Be brief.")
    assert builder.template_messages([message])[0]["role"] == "system"


def test_user_text_cannot_smuggle_image_tokens(tokenizer):
    builder = PromptBuilder(tokenizer, ImageTokens())
    with pytest.raises(BadRequest, match="must not contain"):
        builder.tokenize([user("Look: <IMG_CONTEXT>")])
    with pytest.raises(BadRequest, match="must not contain"):
        builder.tokenize([user(IMAGE, "and another <IMG_CONTEXT>")])


def test_expand_prompt_widens_each_placeholder():
    prompt = TokenizedPrompt(token_ids=[1, 2, 9, 3, 9, 4], image_positions=[2, 4])
    expanded = expand_prompt(prompt, [3, 2])
    assert expanded.token_ids == [1, 2, 9, 9, 9, 3, 9, 9, 4]
    assert expanded.is_text == [True, True, False, False, False, True, False, False, True]
    assert expanded.image_spans == [(2, 5), (6, 8)]
    assert expanded.num_visual_tokens == 5


def test_expand_prompt_without_images_is_identity():
    prompt = TokenizedPrompt(token_ids=[5, 6, 7], image_positions=[])
    expanded = expand_prompt(prompt, [])
    assert expanded.token_ids == [5, 6, 7] and all(expanded.is_text) and expanded.image_spans == []


def test_expand_prompt_requires_one_count_per_image():
    with pytest.raises(ValueError):
        expand_prompt(TokenizedPrompt(token_ids=[9], image_positions=[0]), [])


VIDEO = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}


def with_video(*parts) -> ChatMessage:
    content = [part if isinstance(part, dict) else {"type": "text", "text": part} for part in parts]
    return ChatMessage.model_validate({"role": "user", "content": content})


def test_a_video_renders_as_numbered_frames(tokenizer):
    """The model card's video prompt: ``Frame{i}: <image>\\n`` per frame, 1-based."""
    builder = PromptBuilder(tokenizer, ImageTokens())
    prompt = builder.tokenize([with_video(VIDEO, "What happens?")], video_frames=[3])
    assert len(prompt.image_positions) == 3
    frame = "<img><IMG_CONTEXT></img>\n"
    assert tokenizer.decode(prompt.token_ids).startswith(
        f"<|im_start|>user\nFrame1: {frame}Frame2: {frame}Frame3: {frame}What happens?"
    )


def test_videos_and_images_keep_their_order(tokenizer):
    builder = PromptBuilder(tokenizer, ImageTokens())
    messages = [with_video(IMAGE, "then", VIDEO, "and", VIDEO, "?")]
    prompt = builder.tokenize(messages, video_frames=[2, 1])
    assert len(prompt.image_positions) == 4
    text = tokenizer.decode(prompt.token_ids)
    frame = "<img><IMG_CONTEXT></img>\n"
    assert f"user\n{frame}thenFrame1: {frame}Frame2: {frame}andFrame1: {frame}?" in text
    with pytest.raises(ValueError, match="video parts"):
        builder.tokenize(messages, video_frames=[2])


def test_string_template_renders_frames_with_the_image_convention(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = STRING_TEMPLATE
    builder = PromptBuilder(tokenizer, ImageTokens())
    messages = builder.template_messages([with_video(VIDEO, "Why?")], video_frames=[2])
    assert messages == [{"role": "user", "content": "Frame1: <image>\nFrame2: <image>\nWhy?"}]


def test_videos_are_refused_outside_user_messages():
    with pytest.raises(ValueError, match="videos are only accepted in user messages"):
        ChatMessage.model_validate({"role": "assistant", "content": [VIDEO]})
