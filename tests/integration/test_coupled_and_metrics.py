"""The coupled baseline (vision in the language process) and the Prometheus series."""

from __future__ import annotations

import re

import httpx
import pytest
from helpers import data_url, gradient_image, noise_image

pytestmark = pytest.mark.slow


def greedy(base_url: str, messages, **params):
    body = {
        "model": "dvd-tiny-internvl",
        "messages": messages,
        "temperature": 0,
        "max_tokens": 16,
        "return_token_ids": True,
        **params,
    }
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def image_message(image, text: str):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": text},
            ],
        }
    ]


CASES = [
    image_message(noise_image(700, 300, seed=41), "What is this?"),
    image_message(gradient_image(448, 896, seed=42), "Describe the colours."),
    [{"role": "user", "content": "Only text here."}],
]


@pytest.mark.parametrize("vir", ["auto", "off", "max"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_coupled_and_decoupled_give_identical_answers(stacks, case, vir):
    """Same Flash checkpoint, same requests: in-process encoding vs the gRPC vision service."""
    dvd = greedy(stacks["flash"].base_url, CASES[case], vir=vir)
    coupled = greedy(stacks["coupled"].base_url, CASES[case], vir=vir)
    assert coupled["choices"][0]["token_ids"] == dvd["choices"][0]["token_ids"]
    assert coupled["usage"] == dvd["usage"]
    assert coupled.get("vision") == dvd.get("vision")


def _scrape(base_url: str) -> dict[str, float]:
    series: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        match = re.match(r"^([\w:]+(?:\{[^}]*\})?)\s+([0-9.eE+-]+)$", line)
        if match:
            series[match.group(1)] = float(match.group(2))
    return series


def _total(series: dict[str, float], name: str, **labels: str) -> float:
    return sum(
        value
        for key, value in series.items()
        if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items())
    )


@pytest.mark.parametrize("stack", ["flash", "coupled"])
def test_metrics_move_when_requests_are_served(stacks, stack):
    base_url = stacks[stack].base_url
    before = _scrape(base_url)
    reply = greedy(base_url, CASES[0])
    httpx.post(
        f"{base_url}/v1/chat/completions", json={"model": "nope", "messages": []}, timeout=30
    )
    after = _scrape(base_url)

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    usage = reply["usage"]
    assert delta("dvd:http_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta("dvd:http_requests_total", route="/v1/chat/completions", status="400") == 1
    assert delta("dvd:time_to_first_token_seconds_count") == 1
    assert delta("dvd:e2e_request_latency_seconds_count") == 1
    assert delta("dvd:image_wait_seconds_count") == 1
    assert delta("dvd:image_encode_seconds_count") == 1
    assert delta("dvd:image_queue_wait_seconds_count") == 1
    assert delta("dvd:images_total") == 1
    assert delta("dvd:image_tokens_total") == usage["prompt_tokens_details"]["image_tokens"]
    vision = reply["vision"]
    assert delta("dvd:vir_tokens_saved_total") == vision["tiles"] * 256 - vision["image_tokens"]
    assert delta("dvd:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("dvd:generation_tokens_total") == usage["completion_tokens"]
    assert _total(after, "dvd:requests_in_flight") == 0
    if stack == "flash":  # bytes only cross a wire in the decoupled deployment
        assert (
            delta("dvd:image_embedding_bytes_total")
            == usage["prompt_tokens_details"]["image_tokens"] * 128 * 4
        )
        assert delta("dvd:image_transfer_seconds_count") == 1
    # vLLM's engine series are served from the same page.
    assert "vllm:num_requests_running" in {key.split("{")[0] for key in after}
    assert "vllm:num_requests_waiting" in {key.split("{")[0] for key in after}
    assert delta("vllm:prompt_tokens_total") == usage["prompt_tokens"]
