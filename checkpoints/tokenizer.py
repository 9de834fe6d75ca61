"""A small byte-level BPE tokenizer trained locally, with InternVL's special tokens.

The tiny checkpoints need a real tokenizer (vLLM detokenizes with it, transformers' chat
template machinery renders with it) but no download: this trains one in well under a second
on a deterministic synthetic corpus.
"""

from __future__ import annotations

import random
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


def train_tokenizer(vocab_size: int = 2048) -> Tokenizer:
    """Train the byte-level BPE tokenizer (deterministic: fixed corpus, fixed settings)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write the tokenizer in the Hugging Face format that transformers and vLLM load."""
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        model_max_length=8192,
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO,
        },
        chat_template=CHAT_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(str(out_dir))
