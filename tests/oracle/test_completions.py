"""``/v1/completions`` end to end, with the official ``openai`` client on the session's "hf"
stack: greedy tokens and logprobs against transformers' InternVL on the same checkpoint (the
text prompt fed as ``transformers`` tokenizes it), several prompts and choices, echo,
streaming with usage, and the refusals."""

from __future__ import annotations

import openai
import pytest
import torch
from openai import OpenAI
from reference import TransformersOracle

pytestmark = pytest.mark.slow

MODEL = "dvd-tiny-internvl"
PROMPT = "The sky at night is full of"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def client(stacks) -> OpenAI:
    return OpenAI(base_url=f"{stacks['hf'].base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oracle(tiny_models) -> TransformersOracle:
    return TransformersOracle(tiny_models["hf"])


@pytest.fixture(scope="module")
def expected(oracle):
    """transformers' greedy continuation of PROMPT: token ids, and the log-softmax of the
    logits over prompt and answer ([prompt + answer - 1, vocab], row i predicts token i+1)."""
    prompt_ids = oracle.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = oracle.model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        sequence = out.sequences
        logits = oracle.model(input_ids=sequence).logits[0].float()
    answer = sequence[0, prompt_ids.shape[1] :].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return {
        "prompt_ids": prompt_ids[0].tolist(),
        "answer": answer,
        "text": oracle.tokenizer.decode(answer, skip_special_tokens=True),
        "log_softmax": torch.log_softmax(logits, dim=-1)[:-1],
        "margins": margins,
    }


def greedy(client: OpenAI, prompt, **params):
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=params.pop("max_tokens", MAX_TOKENS),
        temperature=0,
        extra_body={"return_token_ids": True},
        **params,
    )


def test_greedy_answer_equals_transformers(client, expected):
    # The comparison is sharp: varied tokens, with clear logit margins.
    assert len(set(expected["answer"])) > MAX_TOKENS // 2
    assert min(expected["margins"]) > 1e-2
    reply = greedy(client, PROMPT)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert choice.model_extra["token_ids"] == expected["answer"]
    assert choice.text == expected["text"]
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(expected["prompt_ids"])
    assert reply.usage.completion_tokens == MAX_TOKENS
    # A token-id prompt is the same prompt.
    by_ids = greedy(client, expected["prompt_ids"]).choices[0]
    assert by_ids.model_extra["token_ids"] == expected["answer"]


def test_echo_with_logprobs_equals_transformers(client, expected):
    reply = greedy(client, PROMPT, echo=True, logprobs=3)
    choice = reply.choices[0]
    assert choice.text == PROMPT + expected["text"]
    logprobs = choice.logprobs
    ids = expected["prompt_ids"] + expected["answer"]
    assert len(logprobs.tokens) == len(ids)
    # The prompt's first token has nothing before it: null, as OpenAI and vLLM send it.
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position in range(1, len(ids)):
        row = expected["log_softmax"][position - 1]
        assert logprobs.token_logprobs[position] == pytest.approx(
            float(row[ids[position]]), abs=1e-3
        )
        top = logprobs.top_logprobs[position]
        assert len(top) <= 4  # the 3 best and the token itself
        if len(top) >= 3:  # (tokens whose texts coincide share one key)
            assert sorted(top.values(), reverse=True)[:3] == pytest.approx(
                row.topk(3).values.tolist(), abs=1e-3
            )
    # Offsets index the choice's text.
    assert logprobs.text_offset[0] == 0
    for offset, token, following in zip(
        logprobs.text_offset, logprobs.tokens, logprobs.text_offset[1:], strict=False
    ):
        assert following == offset + len(token)


def test_echo_without_generation_returns_the_prompt(client, expected):
    reply = greedy(client, PROMPT, echo=True, max_tokens=0, logprobs=0)
    choice = reply.choices[0]
    assert choice.text == PROMPT
    assert len(choice.logprobs.tokens) == len(expected["prompt_ids"])
    assert reply.usage.completion_tokens == 0


def test_several_prompts_and_choices(client, expected):
    prompts = [PROMPT, "Once upon a time"]
    reply = client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=1.0, seed=7
    )
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.completion_tokens == 4 * 4
    first = greedy(client, prompts[1], max_tokens=4).usage.prompt_tokens
    assert reply.usage.prompt_tokens == len(expected["prompt_ids"]) + first


def test_stream_equals_the_whole_answer(client, expected):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == expected["text"]
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert all(chunk.object == "text_completion" for chunk in chunks)


def test_stop_sequence(client, expected):
    stop = expected["text"][5:9]
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert stop not in reply.choices[0].text
    assert expected["text"].startswith(reply.choices[0].text)


@pytest.mark.parametrize(
    ("params", "param", "fragment"),
    [
        ({"suffix": "and the moon."}, "suffix", "suffix is not supported"),
        ({"n": 9}, "n", "limit of 8"),
        ({"prompt": ["a"] * 65}, "prompt", "65 prompts"),
        ({"max_tokens": 0}, "max_tokens", "needs echo"),
        ({"prompt": [1, 2, 10**6]}, "prompt", "out of the vocabulary"),
        ({"max_tokens": 10**6}, "prompt", "maximum context length"),
        ({"logprobs": 21}, "logprobs", ""),
        ({"best_of": 3}, "best_of", "best_of"),
        ({"stop": ["x"] * 17}, "stop", "17 stop sequences"),
    ],
)
def test_refusals(client, params, param, fragment):
    body = {"model": MODEL, "prompt": PROMPT, **params}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**body)
    error = caught.value.body
    assert error["param"] == param, error
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
