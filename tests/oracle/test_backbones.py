"""The InternVL3.5 family's other language backbones: Qwen3-MoE (routed experts) and GPT-OSS
(routed experts, attention sinks, sliding-window layers, harmony chat format).

The checkpoint tests need no server. The end-to-end tests start a vision and a language server
per backbone and layout (real processes on 127.0.0.1) and compare greedy answers with
transformers' InternVL on the same checkpoint, as ``test_e2e_chat.py`` does for dense Qwen3.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from chats import (
    CONVERSATIONS,
    MAX_TOKENS,
    chat,
    compare_with_oracle,
    greedy,
    image_part,
    stream_chunks,
)
from helpers import Stack, gradient_image, noise_image, process_fixture, start_stacks
from margins import MARGIN_BOUND
from reference import OracleAnswer, TransformersOracle, to_oracle_messages
from safetensors import safe_open

from checkpoints import tokenizer as tiny_tokenizer
from checkpoints.llm_weights import language_model_weight_name
from checkpoints.spec import CheckpointError, load_checkpoint_spec
from checkpoints.tiny import BACKBONES, write_tiny_checkpoint
from llm_server.engine.backbone import backbone_of
from llm_server.engine.model_files import language_model_config_dir

# Four stacks of its own: they must not be up while the session's shared stacks are.
pytestmark = pytest.mark.runs_first

MOE_BACKBONES = ["qwen3_moe", "gpt_oss"]
LAYOUTS = ["hf", "original"]


@pytest.fixture(scope="module")
def backbone_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Tiny checkpoints (seed 0) of each backbone in both layouts."""
    root = tmp_path_factory.mktemp("backbones")
    return {
        (llm, layout): write_tiny_checkpoint(
            root / f"tiny-{llm}-{layout}", seed=0, layout=layout, llm=llm
        )
        for llm in MOE_BACKBONES
        for layout in LAYOUTS
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        return {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118


# ---- checkpoints ----------------------------------------------------------------------------

# Layer-0 language-model tensors under the names OpenGVLab's checkpoints use: Qwen3-MoE keeps
# one module per expert and a `gate` router; GPT-OSS keeps its fused expert tensors with
# biases, a `router` with bias, and per-head attention sinks.
SHIPPED_NAMES = {
    "qwen3_moe": [
        "mlp.gate.weight",
        *(f"mlp.experts.{e}.{p}_proj.weight" for e in range(8) for p in ("gate", "up", "down")),
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
    ],
    "gpt_oss": [
        "mlp.router.weight",
        "mlp.router.bias",
        "mlp.experts.gate_up_proj",
        "mlp.experts.gate_up_proj_bias",
        "mlp.experts.down_proj",
        "mlp.experts.down_proj_bias",
        "self_attn.sinks",
        "self_attn.q_proj.bias",
    ],
}


@pytest.mark.parametrize("llm", MOE_BACKBONES)
def test_original_layout_uses_the_shipped_names(backbone_models, llm):
    path = backbone_models[(llm, "original")]
    names = set(_tensors(path))
    for leaf in SHIPPED_NAMES[llm]:
        assert f"language_model.model.layers.0.{leaf}" in names
    if llm == "qwen3_moe":  # no fused expert tensors: that is transformers' in-memory form
        assert not any(
            name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in names
        )
    llm_config = json.loads((path / "config.json").read_text())["llm_config"]
    assert llm_config["architectures"] == [BACKBONES[llm].architecture]
    assert llm_config["model_type"] == llm
    expert_key = "num_experts" if llm == "qwen3_moe" else "num_local_experts"
    assert llm_config[expert_key] == 8 and llm_config["num_experts_per_tok"] == 2


@pytest.mark.parametrize("llm", MOE_BACKBONES)
def test_both_layouts_hold_the_same_language_model(backbone_models, llm):
    """The same tensors reach vLLM from either layout, and the same backbone is read."""

    def language_model(layout: str) -> dict[str, torch.Tensor]:
        tensors = _tensors(backbone_models[(llm, layout)])
        return {
            mapped: tensor
            for name, tensor in tensors.items()
            if (mapped := language_model_weight_name(name)) is not None
        }

    hf, original = language_model("hf"), language_model("original")
    assert hf.keys() == original.keys()
    assert all(torch.equal(hf[name], original[name]) for name in hf)
    specs = [load_checkpoint_spec(backbone_models[(llm, layout)]) for layout in LAYOUTS]
    assert backbone_of(specs[0].text_config) == backbone_of(specs[1].text_config)


def test_backbones_are_read_from_the_checkpoint(backbone_models, tiny_models):
    described = {
        llm: backbone_of(
            load_checkpoint_spec(backbone_models[(llm, "original")]).text_config
        ).describe()
        for llm in MOE_BACKBONES
    }
    assert described == {
        "qwen3_moe": "qwen3_moe (Qwen3MoeForCausalLM, 8 experts, top 2)",
        "gpt_oss": "gpt_oss (GptOssForCausalLM, 8 experts, top 2, sliding window 128, "
        "attention sinks)",
    }
    dense = backbone_of(load_checkpoint_spec(tiny_models["hf"]).text_config)
    assert dense.describe() == "qwen3 (Qwen3ForCausalLM)"


@pytest.mark.parametrize(
    ("llm_config", "described"),
    [
        (  # InternVL3.5-30B-A3B's language model, as its llm_config names it
            {
                "architectures": ["Qwen3MoeForCausalLM"],
                "model_type": "qwen3_moe",
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "sliding_window": None,
            },
            "qwen3_moe (Qwen3MoeForCausalLM, 128 experts, top 8)",
        ),
        (  # GPT-OSS-20B as OpenAI ships it, MXFP4 experts
            {
                "architectures": ["GptOssForCausalLM"],
                "model_type": "gpt_oss",
                "num_local_experts": 32,
                "num_experts_per_tok": 4,
                "sliding_window": 128,
                "quantization_config": {"quant_method": "mxfp4"},
            },
            "gpt_oss (GptOssForCausalLM, 32 experts, top 4, sliding window 128, "
            "attention sinks, mxfp4 weights)",
        ),
        (  # InternVL3's Qwen2.5: a sliding_window value, but no layer uses it
            {"model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False},
            "qwen2 (Qwen2ForCausalLM)",
        ),
    ],
)
def test_backbone_description_of_published_configs(llm_config, described):
    assert backbone_of(llm_config).describe() == described


def test_an_unsupported_language_model_is_refused_before_the_engine_starts(tiny_models, tmp_path):
    config = json.loads((tiny_models["original"] / "config.json").read_text())
    config["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    config["llm_config"]["model_type"] = "internlm2"
    folder = tmp_path / "internlm2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    spec = load_checkpoint_spec(folder)
    with pytest.raises(CheckpointError, match="InternLM2ForCausalLM is not supported"):
        language_model_config_dir(spec, tmp_path / "cache")


def test_harmony_chat_format(backbone_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(backbone_models[("gpt_oss", "hf")]))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "Dots."},
        {"role": "user", "content": "Which colour?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = tiny_tokenizer.HARMONY_SYSTEM_MESSAGE
    assert text == (
        f"<|start|>system<|message|>{system}<|end|>"
        "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
        "<|start|>user<|message|><IMG_CONTEXT>\nWhat?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Dots.<|end|>"
        "<|start|>user<|message|>Which colour?<|end|>"
        "<|start|>assistant"
    )
    # Every harmony marker is one special token, as in GPT-OSS's tokenizer.
    markers = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"]
    ids = tokenizer.encode("".join(markers), add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == markers
    generation = json.loads(
        (backbone_models[("gpt_oss", "hf")] / "generation_config.json").read_text()
    )
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(
        ["<|return|>", "<|endoftext|>", "<|call|>"]
    )
    assert tokenizer.eos_token == "<|return|>"


def test_qwen3_moe_keeps_chatml(backbone_models):
    from transformers import AutoTokenizer

    path = backbone_models[("qwen3_moe", "hf")]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"]
    )


def test_the_tiny_model_cache_is_keyed_by_backbone(tmp_path):
    from checkpoints.default import tiny_checkpoint

    paths = {llm: tiny_checkpoint(tmp_path, flash=False, llm=llm) for llm in ("qwen3", "gpt_oss")}
    assert paths["qwen3"] != paths["gpt_oss"]
    for llm, path in paths.items():
        assert backbone_of(load_checkpoint_spec(path).text_config).model_type == llm


# ---- the oracle sees each architecture ------------------------------------------------------


@pytest.fixture(scope="module")
def oracles(backbone_models) -> dict[str, TransformersOracle]:
    return {llm: TransformersOracle(backbone_models[(llm, "hf")]) for llm in MOE_BACKBONES}


@pytest.fixture(scope="module")
def oracle_answers(oracles) -> dict[tuple[str, str], OracleAnswer]:
    answers = {}
    for llm, oracle in oracles.items():
        for name, messages in CONVERSATIONS.items():
            converted, images = to_oracle_messages(messages)
            answers[(llm, name)] = oracle.generate(converted, images, MAX_TOKENS)
    return answers


@contextmanager
def _patched(oracle: TransformersOracle, llm: str, change: str) -> Iterator[None]:
    """Temporarily change one architectural feature of the oracle's language model."""
    text_model = oracle.model.model.language_model
    saved: list[Any] = []
    for layer in text_model.layers:
        if change == "top1":
            router = layer.mlp.router if llm == "gpt_oss" else layer.mlp.gate
            saved.append(router.top_k)
            router.top_k = 1
        elif change == "no_sinks":
            saved.append(layer.self_attn.sinks.data.clone())
            layer.self_attn.sinks.data.fill_(-1e9)  # exp(-1e9) = 0: no sink
        elif change == "no_window":
            saved.append(layer.self_attn.sliding_window)
            if layer.self_attn.sliding_window:
                layer.self_attn.sliding_window = 10**9
    window = text_model.config.sliding_window
    if change == "no_window":
        text_model.config.sliding_window = 10**9
    try:
        yield
    finally:
        text_model.config.sliding_window = window
        for layer, value in zip(text_model.layers, saved, strict=True):
            if change == "top1":
                (layer.mlp.router if llm == "gpt_oss" else layer.mlp.gate).top_k = value
            elif change == "no_sinks":
                layer.self_attn.sinks.data.copy_(value)
            else:
                layer.self_attn.sliding_window = value


ARCHITECTURE_FEATURES = [
    ("qwen3_moe", "top1"),
    ("gpt_oss", "top1"),
    ("gpt_oss", "no_sinks"),
    ("gpt_oss", "no_window"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("llm", "change"), ARCHITECTURE_FEATURES)
def test_answers_depend_on_the_architecture(oracles, oracle_answers, llm, change):
    """The end-to-end comparison is not blind to routing, sinks or the window: changing one of
    them changes the oracle's greedy answers (and the answer comes back once it is undone)."""
    oracle = oracles[llm]
    with _patched(oracle, llm, change):
        changed = {}
        for name in ("one_image", "text_only"):
            converted, images = to_oracle_messages(CONVERSATIONS[name])
            changed[name] = oracle.generate(converted, images, MAX_TOKENS).token_ids
    for name, token_ids in changed.items():
        assert token_ids != oracle_answers[(llm, name)].token_ids, name
    converted, images = to_oracle_messages(CONVERSATIONS["text_only"])
    restored = oracle.generate(converted, images, MAX_TOKENS).token_ids
    assert restored == oracle_answers[(llm, "text_only")].token_ids


# ---- end to end -----------------------------------------------------------------------------


@process_fixture(scope="module")
def backbone_stacks(backbone_models, log_dir) -> Iterator[dict[tuple[str, str], Stack]]:
    """A vision server and a language server per backbone and layout."""
    names = {f"{llm}-{layout}": path for (llm, layout), path in backbone_models.items()}
    running = start_stacks(names, log_dir)
    try:
        yield {(llm, layout): running[f"{llm}-{layout}"] for llm, layout in backbone_models}
    finally:
        for stack in running.values():
            stack.stop()


def _served_text(oracle_text: str) -> str:
    """The oracle's text as the server sends it: when max_tokens cuts a character's UTF-8 bytes
    in two, transformers decodes the stray bytes as U+FFFD; vLLM's incremental detokenizer
    (``vllm serve`` too) holds them back, since more bytes could still complete them."""
    return oracle_text.rstrip("\ufffd")


# Harmony's markers that a message's text may contain (the harmony parser reads them inside a
# message as text), and those that end a message.
HARMONY_TEXT_MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"]
HARMONY_ENDS = ["<|end|>", "<|return|>", "<|call|>"]


def harmony_final_text(tokenizer: Any, token_ids: list[int]) -> str:
    """The content of a GPT-OSS answer, read by the test itself from the oracle's token ids:
    the header before the first <|message|> must be <|channel|>final; the content is what
    follows up to <|end|>, <|return|> or <|call|>, with the other special tokens (InternVL's
    image and grounding tokens, <|endoftext|>) left out. The answer must end there: a second
    message would need the full harmony grammar, which this reading does not implement."""
    message = tokenizer.convert_tokens_to_ids("<|message|>")
    start = token_ids.index(message)
    assert token_ids[:start] == tokenizer.encode("<|channel|>final", add_special_tokens=False)
    body = token_ids[start + 1 :]
    ends = set(tokenizer.convert_tokens_to_ids(HARMONY_ENDS))
    cut = next((i for i, token in enumerate(body) if token in ends), len(body))
    assert cut >= len(body) - 1, "the answer goes on after its first message"
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special
    }
    kept = set(tokenizer.convert_tokens_to_ids(HARMONY_TEXT_MARKERS))
    text = [token for token in body[:cut] if token not in special or token in kept]
    return _served_text(tokenizer.decode(text, skip_special_tokens=False))


def served_content(llm: str, oracle: TransformersOracle, expected: OracleAnswer) -> str:
    """What the server's ``content`` must be for the oracle's answer: GPT-OSS's final channel,
    the Qwen3 family's text."""
    if llm == "gpt_oss":
        return harmony_final_text(oracle.tokenizer, expected.token_ids)
    return _served_text(expected.text)


def stream_choices(base_url: str, messages, **params) -> list[dict[str, Any]]:
    """The streamed choices, in order, across every chunk."""
    return [
        choice
        for chunk in stream_chunks(base_url, messages, **params)
        for choice in chunk["choices"]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("llm", MOE_BACKBONES)
def test_greedy_answer_equals_transformers(
    backbone_stacks, oracles, oracle_answers, llm, layout, conversation
):
    expected = oracle_answers[(llm, conversation)]
    # The comparison is sharp: at least 16 tokens, varied, with clear logit margins.
    assert len(expected.token_ids) >= 16
    assert len(set(expected.token_ids)) > len(expected.token_ids) // 2
    assert min(expected.margins) > 1e-2

    reply = greedy(backbone_stacks[(llm, layout)].base_url, CONVERSATIONS[conversation])
    choice = reply["choices"][0]
    # The same tokens up to the first near tie where the runs part (margins.py).
    comparison = compare_with_oracle(choice, expected, f"{llm}/{layout}/{conversation}")
    if comparison.complete:  # past a near tie the contents continue different prefixes
        assert choice["message"]["content"] == served_content(llm, oracles[llm], expected)
    if llm == "gpt_oss":  # the channel's name was in the answer, and is not in the content
        assert expected.text.startswith("final")
        assert not choice["message"]["content"].startswith("final")
    assert reply["usage"]["prompt_tokens"] == expected.num_prompt_tokens
    assert reply["usage"]["prompt_tokens_details"]["image_tokens"] == expected.num_visual_tokens


@pytest.mark.slow
@pytest.mark.parametrize("llm", MOE_BACKBONES)
def test_a_different_image_gives_a_different_answer(backbone_stacks, oracles, llm):
    question = {"type": "text", "text": "What is shown in this picture?"}
    messages = [
        [{"role": "user", "content": [image_part(image), question]}]
        for image in (noise_image(700, 300, seed=5), gradient_image(600, 500, seed=6))
    ]
    base_url = backbone_stacks[(llm, "hf")].base_url
    choices = [greedy(base_url, m)["choices"][0] for m in messages]
    assert choices[0]["token_ids"] != choices[1]["token_ids"]
    for image, (choice, conversation) in enumerate(zip(choices, messages, strict=True)):
        converted, images = to_oracle_messages(conversation)
        expected = oracles[llm].generate(converted, images, MAX_TOKENS)
        compare_with_oracle(choice, expected, f"{llm}, image {image}")


@pytest.mark.slow
@pytest.mark.parametrize("llm", MOE_BACKBONES)
def test_stop_tokens_end_the_answer_as_in_transformers(backbone_stacks, oracles, llm):
    """Questions whose greedy answer ends on one of the checkpoint's stop tokens end there
    through DvD too. The questions are scanned until two different stop tokens came up: the
    tokenizer's end token and one that only the generation config lists (GPT-OSS stops on
    <|return|>, <|endoftext|> and <|call|>; Qwen3 on <|im_end|> and <|endoftext|>)."""
    oracle = oracles[llm]
    stop_ids = set(oracle.model.generation_config.eos_token_id)
    first_stop: dict[int, tuple[list[dict[str, Any]], OracleAnswer]] = {}
    for i in range(160):
        messages = [{"role": "user", "content": f"Question {i}: what is the answer?"}]
        expected = oracle.generate(messages, [], 64)
        # Only answers without a near tie (margins.py): then the served answer cannot part
        # from this one before the stop token.
        sharp = min(expected.margins) >= MARGIN_BOUND
        if expected.token_ids[-1] in stop_ids and len(expected.token_ids) < 64 and sharp:
            first_stop.setdefault(expected.token_ids[-1], (messages, expected))
            if len(first_stop) == 2:
                break
    assert len(first_stop) == 2, "fewer than two stop tokens came up: the check would be blind"
    base_url = backbone_stacks[(llm, "hf")].base_url
    for messages, expected in first_stop.values():
        reply = greedy(base_url, messages, max_tokens=64)
        choice = reply["choices"][0]
        # Every step up to the stop token is compared: the answer ends where it ends.
        comparison = compare_with_oracle(
            choice, expected, f"{llm}, stop token {expected.token_ids[-1]}", min_compared=0
        )
        assert comparison.complete, comparison
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["content"] == served_content(llm, oracle, expected)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("llm", MOE_BACKBONES)
def test_models_endpoint_and_start_up_log_name_the_backbone(backbone_stacks, llm, layout):
    stack = backbone_stacks[(llm, layout)]
    models = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()
    assert [card["backbone"] for card in models["data"]] == [llm]
    log = stack.llm.log_path.read_text(errors="replace")
    assert re.search(rf"language model: {llm} \({BACKBONES[llm].architecture}, 8 experts", log)
    assert re.search(rf"language engine ready: \S+, {llm}, float32", log)


# ---- GPT-OSS: harmony messages through the API ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("conversation", ["two_images", "text_only"])
def test_gpt_oss_stream_concatenates_to_the_whole_answer(
    backbone_stacks, oracles, oracle_answers, conversation
):
    """Streamed content deltas join up to the non-streamed content, which is the final
    channel's text; no delta carries the header."""
    base_url = backbone_stacks[("gpt_oss", "hf")].base_url
    messages = CONVERSATIONS[conversation]
    whole = greedy(base_url, messages)["choices"][0]
    expected = harmony_final_text(
        oracles["gpt_oss"].tokenizer, oracle_answers[("gpt_oss", conversation)].token_ids
    )
    assert whole["message"]["content"] == expected
    chunks = stream_choices(base_url, messages, temperature=0, max_tokens=MAX_TOKENS)
    deltas = [chunk["delta"].get("content") or "" for chunk in chunks]
    assert "".join(deltas) == expected
    assert sum(1 for delta in deltas if delta) > 5  # token by token, not all at the end
    assert not any(delta.startswith("final") for delta in deltas[:3])
    assert not any(chunk["delta"].get("reasoning") for chunk in chunks)
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]


@pytest.mark.slow
def test_gpt_oss_structured_output_keeps_the_header(backbone_stacks, oracles):
    """A JSON schema constrains the final channel's message, as vllm serve does for GPT-OSS:
    the answer still opens with the harmony header, and its content is the JSON."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    base_url = backbone_stacks[("gpt_oss", "hf")].base_url
    # The random model pads the JSON with whitespace: room for it to close the object.
    params: dict[str, Any] = {"temperature": 0, "max_tokens": 400, "return_token_ids": True}
    free = chat(base_url, CONVERSATIONS["one_image"], **params)["choices"][0]["message"]
    with pytest.raises(ValueError):  # unconstrained, the answer is not JSON
        json.loads(free["content"])
    reply = chat(
        base_url,
        CONVERSATIONS["one_image"],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        **params,
    )
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    tokenizer = oracles["gpt_oss"].tokenizer
    header = tokenizer.encode("<|channel|>final", add_special_tokens=False)
    assert choice["token_ids"][: len(header)] == header
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    assert choice["message"].get("reasoning") is None


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_gpt_oss_tool_call_is_read_from_a_message_to_a_function(
    backbone_stacks, oracles, tool_choice
):
    """A forced call: vLLM's harmony grammar makes the model address a message to the function
    (``<|channel|>... to=functions.get_weather ... <|message|>{json}``, then a stop token); the
    reply carries the call, whole and streamed alike, and no content."""
    import jsonschema

    base_url = backbone_stacks[("gpt_oss", "hf")].base_url
    messages = CONVERSATIONS["one_image"]
    params: dict[str, Any] = {
        "temperature": 0,
        "max_tokens": 80,
        "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice,
    }
    reply = chat(base_url, messages, return_token_ids=True, **params)
    choice = reply["choices"][0]
    tokenizer = oracles["gpt_oss"].tokenizer
    # The grammar also admits harmony's markers spelt out in ordinary tokens, which harmony
    # reads as text (as vllm serve does); on this prompt the model writes the real markers.
    ids = choice["token_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|channel|>")
    assert tokenizer.convert_tokens_to_ids("<|message|>") in ids
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert "to=functions.get_weather" in text
    assert ids[-1] in tokenizer.convert_tokens_to_ids(HARMONY_ENDS[1:])  # <|return|>, <|call|>
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])

    chunks = stream_choices(base_url, messages, **params)
    pieces = [piece for chunk in chunks for piece in chunk["delta"].get("tool_calls") or []]
    assert [piece["id"] for piece in pieces if piece.get("id")] != []
    names = "".join((piece.get("function") or {}).get("name") or "" for piece in pieces)
    streamed = "".join((piece.get("function") or {}).get("arguments") or "" for piece in pieces)
    assert names == "get_weather"
    assert json.loads(streamed) == arguments
    assert not any(chunk["delta"].get("content") for chunk in chunks)
    assert chunks[-1]["finish_reason"] == "tool_calls"
