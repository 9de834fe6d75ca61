"""A small byte-level BPE tokenizer trained locally, with InternVL's special tokens.

The tiny checkpoints need a real tokenizer (vLLM detokenizes with it, transformers' chat
template machinery renders with it) but no download: this trains one in well under a second
on a deterministic synthetic corpus.

Each language backbone brings its own chat format, as the real checkpoints do: Qwen3 and
Qwen3-MoE speak ChatML (``<|im_start|>``/``<|im_end|>``), GPT-OSS speaks OpenAI's harmony
format (``<|start|>``/``<|message|>``/``<|end|>``, answers on a channel, ended by
``<|return|>``). The learned vocabulary is the same for all of them; only the special tokens
after it differ.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO = "<video>"

# Order fixes the ids: the chat and image tokens come right after the learned vocabulary.
SPECIAL_TOKENS = [
    END_OF_TEXT,
    IM_START,
    IM_END,
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
    VIDEO,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]

# Chat template: ChatML. An image part renders as the context-image token, which the processor
# (ours, or transformers' InternVLProcessor) expands to <img> + n x <IMG_CONTEXT> + </img>.
# Tools follow the hermes convention of Qwen3 checkpoints: the function signatures go into the
# system turn inside <tools></tools>, the assistant calls them with <tool_call> blocks holding
# {"name": ..., "arguments": ...}, and consecutive tool results come back in one user turn as
# <tool_response> blocks. A conversation without tools renders as plain ChatML.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' and messages[0]['content'] is string -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- 'You can call these functions (JSON signatures, one per line):\\n<tools>' -}}"
    "{%- for tool in tools -%}"
    "{{- '\\n' + (tool | tojson) -}}"
    "{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call functions, answer with one block per call:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <arguments-json-object>}\\n</tool_call>'
    "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system'"
    " and message['content'] is string -%}"
    "{#- already part of the tools system turn -#}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{- '<|im_start|>user' -}}"
    "{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined"
    " and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set function = call['function'] if call['function'] is defined else call -%}"
    "{%- if not loop.first or message['content'] -%}"
    "{{- '\\n' -}}"
    "{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' -}}"
    "{%- if function['arguments'] is string -%}"
    "{{- function['arguments'] -}}"
    "{%- else -%}"
    "{{- function['arguments'] | tojson -}}"
    "{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# ---- GPT-OSS: the harmony format ------------------------------------------------------------

START_OF_TEXT = "<|startoftext|>"
HARMONY_START = "<|start|>"
HARMONY_END = "<|end|>"
HARMONY_MESSAGE = "<|message|>"
HARMONY_CHANNEL = "<|channel|>"
HARMONY_CONSTRAIN = "<|constrain|>"
HARMONY_RETURN = "<|return|>"  # ends the assistant's final answer
HARMONY_CALL = "<|call|>"  # ends a tool call

# END_OF_TEXT stays first, so that it is the same id in every tiny tokenizer.
HARMONY_SPECIAL_TOKENS = [
    END_OF_TEXT,
    START_OF_TEXT,
    HARMONY_START,
    HARMONY_END,
    HARMONY_MESSAGE,
    HARMONY_CHANNEL,
    HARMONY_CONSTRAIN,
    HARMONY_RETURN,
    HARMONY_CALL,
    *SPECIAL_TOKENS[3:],  # the InternVL image and grounding tokens
]

# The system message InternVL3.5's GPT-OSS model is trained with: harmony's header fields, with
# "final" as the only valid channel (no separate reasoning channel).
HARMONY_SYSTEM_MESSAGE = (
    "You are InternVL, a multimodal assistant.\n"
    "Knowledge cutoff: 2024-06\n\n"
    "Reasoning: low\n\n"
    "# Valid channels: final. Channel must be included for every message."
)

# Harmony chat template: the system message first (always), a caller's system or developer
# message as the developer's instructions, user turns as they are, earlier assistant turns on
# the final channel; the generation prompt opens an assistant message, and the model writes
# the channel header, the answer and <|return|>. Image parts render as the context-image token,
# as in CHAT_TEMPLATE.
HARMONY_CHAT_TEMPLATE = (
    "{{- '<|start|>system<|message|>" + HARMONY_SYSTEM_MESSAGE.replace("\n", "\\n") + "<|end|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- set text.value = text.value + '<IMG_CONTEXT>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- set text.value = text.value + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = text.value -%}"
    "{%- endif -%}"
    "{%- if message['role'] in ('system', 'developer') -%}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + text + '<|end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + text + '<|end|>' -}}"
    "{%- else -%}"
    "{{- '<|start|>' + message['role'] + '<|message|>' + text + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start|>assistant' -}}"
    "{%- endif -%}"
)


# Harmony's role and channel names are single ordinary tokens in GPT-OSS's tokenizer; the tiny
# one has them whole too (after the special tokens), so that a header is a few tokens.
HARMONY_HEADER_WORDS = ["assistant", "analysis", "commentary", "final"]


@dataclass(frozen=True)
class ChatFormat:
    """A backbone's special tokens, chat template and stop tokens."""

    special_tokens: list[str]
    chat_template: str
    eos_token: str
    stop_tokens: list[str]  # generation_config.json's eos_token_id, in this order
    whole_words: tuple[str, ...] = ()  # ordinary tokens added after the special ones


CHATML = ChatFormat(SPECIAL_TOKENS, CHAT_TEMPLATE, IM_END, [IM_END, END_OF_TEXT])
# GPT-OSS stops on <|return|>, <|endoftext|> and <|call|>, as its generation config lists them.
HARMONY = ChatFormat(
    HARMONY_SPECIAL_TOKENS,
    HARMONY_CHAT_TEMPLATE,
    HARMONY_RETURN,
    [HARMONY_RETURN, END_OF_TEXT, HARMONY_CALL],
    tuple(HARMONY_HEADER_WORDS),
)
CHAT_FORMATS = {"chatml": CHATML, "harmony": HARMONY}

# Size of the learned part of the vocabulary (the ChatML tokenizer is 2048 tokens in all).
LEARNED_VOCAB_SIZE = 2048 - len(SPECIAL_TOKENS)

_WORDS = (
    "the a an of to in on at by for with from and or but not is are was were be been has "
    "have had do does did can could will would should may might must this that these those "
    "it its image picture photo chart table text page document figure diagram plot graph "
    "screen tile red green blue yellow black white gray orange purple pink brown dark light "
    "bright color left right top bottom middle center corner edge side line row column grid "
    "cell box circle square triangle shape number word letter digit title label caption "
    "legend axis value what where when which who why how many much there here shows describe "
    "read count find one two three four five six seven eight nine ten zero first second "
    "third last next cat dog bird car tree house road sky water cloud sun person people man "
    "woman child hand small large big little long short tall wide narrow high low full empty "
    "open closed answer question please thank you yes no maybe true false model vision "
    "language token stripes pattern flat dense sparse noise texture region area background "
    "foreground detail user assistant system hello world good bad new old same different "
    "other each every all"
).split()


def _corpus(num_sentences: int = 4000, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ":"]))
    return sentences


def train_tokenizer(chat_format: ChatFormat = CHATML) -> Tokenizer:
    """Train the byte-level BPE tokenizer (deterministic: fixed corpus, fixed settings) and add
    ``chat_format``'s special tokens after the learned vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LEARNED_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(chat_format.special_tokens)
    if chat_format.whole_words:
        tokenizer.add_tokens(list(chat_format.whole_words))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, chat_format: ChatFormat = CHATML) -> None:
    """Write the tokenizer in the Hugging Face format that transformers and vLLM load."""
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=chat_format.eos_token,
        pad_token=END_OF_TEXT,
        model_max_length=8192,
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO,
        },
        chat_template=chat_format.chat_template,
    )
    hf_tokenizer.save_pretrained(str(out_dir))
