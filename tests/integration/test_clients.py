"""The benchmark and chat clients: pure pieces, then as real processes against the servers."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from helpers import REPO_ROOT, noise_image
from margins import MARGIN_BOUND, MARGIN_PARAMS, served_margins
from PIL import Image

from clients import benchmark, datasets
from protos.tiling import plan_tiles


def test_synthetic_images_tile_exactly_as_asked():
    for tiles in range(1, 13):
        image = datasets.synthetic_image(tiles, dense_fraction=0.5, seed=tiles)
        plan = plan_tiles(image.width, image.height)
        assert plan.grid_tiles == tiles


def test_synthetic_dataset_is_deterministic_and_mixed():
    options = datasets.SyntheticOptions(num_requests=6, min_tiles=1, max_tiles=4, seed=3)
    first, second = datasets.synthetic(options), datasets.synthetic(options)
    assert [r.messages for r in first] == [r.messages for r in second]
    other = datasets.synthetic(datasets.SyntheticOptions(num_requests=6, max_tiles=4, seed=4))
    assert [r.messages for r in first] != [r.messages for r in other]

    def detail(image: Image.Image) -> float:  # mean horizontal gradient: text is busy, flat is not
        return float(np.abs(np.diff(np.asarray(image, dtype=np.float32), axis=1)).mean())

    dense = datasets.synthetic_image(4, dense_fraction=1.0, seed=1)
    flat = datasets.synthetic_image(4, dense_fraction=0.0, seed=1)
    assert detail(dense) > 20 * detail(flat)


def test_synthetic_videos_are_deterministic_and_mixed():
    """Each request carries one MP4 of the asked length whose frames are dense or flat."""
    import base64

    from vision_server.video import VideoLimits, prepare_video

    options = datasets.SyntheticOptions(num_requests=2, video_frames=12, seed=5)
    first, second = datasets.load("synthetic-video", options), datasets.synthetic_videos(options)
    assert [r.messages for r in first] == [r.messages for r in second]
    part = first[0].messages[0]["content"][0]
    assert part["type"] == "video_url"
    header, _, payload = part["video_url"]["url"].partition(",")
    assert header == "data:video/mp4;base64"
    video = prepare_video(base64.b64decode(payload), 12, VideoLimits())
    assert video.info.total_frames == 12
    detail = [
        float(np.abs(np.diff(tile.float().numpy(), axis=2)).mean()) for tile in video.frames.tiles
    ]
    assert max(detail) > 10 * min(detail)  # some frames text-like, some flat


def test_folder_and_jsonl_datasets(tmp_path):
    for i in range(2):
        noise_image(64, 64, seed=i).save(tmp_path / f"img{i}.png")
    options = datasets.SyntheticOptions(num_requests=3, images_per_request=1)
    folder = datasets.load(f"folder:{tmp_path}", options)
    assert len(folder) == 3 and all(r.num_images == 1 for r in folder)
    lines = [{"prompt": "hi", "images": ["img0.png"], "max_tokens": 5}, {"prompt": "text only"}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    records = datasets.load(f"jsonl:{tmp_path / 'set.jsonl'}", options)
    assert [r.num_images for r in records] == [1, 0, 1]
    assert records[0].max_tokens == 5
    with pytest.raises(ValueError):
        datasets.load("nonsense", options)


def test_multi_turn_conversations(tmp_path):
    options = datasets.SyntheticOptions(num_requests=3, max_tiles=2, turns=4, seed=5)
    conversations = datasets.load("multi-turn", options)
    assert len(conversations) == 3
    assert all(len(c.follow_ups) == 3 and c.num_images == 1 for c in conversations)
    again = datasets.load("multi-turn", options)
    assert [c.follow_ups for c in conversations] == [c.follow_ups for c in again]
    single = datasets.load("synthetic", datasets.SyntheticOptions(num_requests=2, max_tiles=2))
    assert all(not r.follow_ups for r in single)
    line = {"prompt": "hi", "follow_ups": ["and then?", "why?"]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(line))
    (record,) = datasets.load(f"jsonl:{tmp_path / 'chat.jsonl'}", datasets.SyntheticOptions(1))
    assert record.follow_ups == ["and then?", "why?"]


def test_each_turn_sends_the_whole_history():
    """Against a scripted server: turn N carries the image, every question so far and every
    answer as it was streamed."""
    import asyncio

    import httpx

    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        turn = len(bodies)
        events = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
             "vision": {"cached_images": int(turn > 1)}},
            {"choices": [{"index": 0, "delta": {"content": f"answer {turn}"}}]},
            {"choices": [{"index": 0, "delta": {"content": "."}}]},
            {"choices": [], "usage": {"prompt_tokens": 100 * turn, "completion_tokens": 2,
                                      "prompt_tokens_details": {"cached_tokens": 90 * (turn - 1),
                                                                "image_tokens": 64}}},
        ]  # fmt: skip
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    options = datasets.SyntheticOptions(num_requests=1, max_tiles=1, turns=3, seed=2)
    (conversation,) = datasets.load("multi-turn", options)

    async def run() -> list[benchmark.RequestResult]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await benchmark.converse(
                client, "http://test/v1/chat/completions", "m", conversation, False, {}, 0.0
            )

    results = asyncio.run(run())
    assert [r.turn for r in results] == [1, 2, 3] and all(r.success for r in results)
    assert [r.cached_images for r in results] == [0, 1, 1]
    assert [r.cached_tokens for r in results] == [0, 90, 180]
    assert [len(b["messages"]) for b in bodies] == [1, 3, 5]
    last = bodies[-1]["messages"]
    assert last[0] == conversation.messages[0]  # the image, every turn
    assert [m["content"] for m in last[1::2]] == ["answer 1.", "answer 2."]
    assert [m["content"] for m in last[2::2]] == conversation.follow_ups


def test_turn_metrics_and_their_comparison():
    def run(label: str, ttfts: list[float]) -> dict:
        results = [
            benchmark.RequestResult(
                True, ttft_s=ttft, e2el_s=1.0, output_tokens=4, prompt_tokens=100, turn=turn,
                cached_tokens=0 if turn == 1 else 80, image_tokens=64, cached_images=int(turn > 1),
            )
            for conversation in range(2)
            for turn, ttft in enumerate(ttfts, start=1)
        ]  # fmt: skip
        return {"config": {"label": label}, "metrics": benchmark.compute_metrics(results, 4.0)}

    on, off = run("cache on", [1.0, 0.2, 0.2, 0.2]), run("cache off", [1.0, 1.0, 1.2, 1.4])
    by_turn = on["metrics"]["by_turn"]
    assert list(by_turn) == ["1", "2", "3", "4"]
    assert by_turn["2"]["requests"] == 2 and by_turn["2"]["cached_images"] == 2
    assert by_turn["2"]["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert benchmark.later_turns_ratio(on["metrics"]) == pytest.approx(0.2)
    assert benchmark.later_turns_ratio(off["metrics"]) == pytest.approx(1.2)
    table = benchmark.compare_table([off, on])
    assert "| TTFT mean, turn 1 (ms) | 1000" in table
    assert "| TTFT turns 2+ / turn 1 | 1.200 | 0.200 |" in table
    single = benchmark.compute_metrics([benchmark.RequestResult(True, ttft_s=0.1)], 1.0)
    assert single["by_turn"] == {} and benchmark.later_turns_ratio(single) is None


def test_metrics_are_consistent():
    results = [
        benchmark.RequestResult(
            True,
            ttft_s=0.1 * i,
            e2el_s=0.5 + 0.1 * i,
            itl_s=[0.01, 0.02],
            output_tokens=10,
            prompt_tokens=100,
            image_tokens=64,
        )
        for i in range(1, 11)
    ] + [benchmark.RequestResult(False, error="HTTP 503")]
    metrics = benchmark.compute_metrics(results, duration_s=5.0)
    assert (metrics["completed"], metrics["failed"]) == (10, 1)
    assert metrics["request_throughput"] == pytest.approx(2.0)
    assert metrics["output_throughput"] == pytest.approx(20.0)
    assert metrics["total_token_throughput"] == pytest.approx(220.0)
    ttft = metrics["ttft_ms"]
    assert ttft["median"] <= ttft["p90"] <= ttft["p99"]
    assert ttft["mean"] == pytest.approx(550.0)
    assert metrics["tpot_ms"]["mean"] == pytest.approx(500 / 9)
    assert metrics["errors"] == ["HTTP 503"]


def _run_record(label, concurrency, ttfts, throughput):
    requests = [{"success": True, "ttft_s": ttft, "e2el_s": 2 * ttft} for ttft in ttfts] + [
        {"success": False, "ttft_s": None, "e2el_s": None}
    ]
    return {
        "config": {"label": label, "concurrency": concurrency},
        "requests": requests,
        "metrics": {"request_throughput": throughput},
    }


def test_latency_figure_shows_the_runs():
    import matplotlib.pyplot as plt

    runs = [
        _run_record("dvd", 1, [0.3, 0.1, 0.2], 5.0),
        _run_record("dvd", 4, [0.4, 0.5], 12.0),
        _run_record("coupled", 4, [0.6, 0.9], 7.0),
    ]
    fig = benchmark.latency_figure(runs)
    try:
        ttft, e2el, throughput = fig.axes
        assert ttft.get_title() == "TTFT CDF" and e2el.get_title() == "End-to-end latency CDF"
        labels = [line.get_label() for line in ttft.get_lines()]
        assert labels == ["dvd c=1", "dvd c=4", "coupled c=4"]
        first = ttft.get_lines()[0]
        # Successful requests only, in ms, sorted; the CDF climbs to 1.
        assert list(first.get_xdata()) == pytest.approx([100, 200, 300])
        assert list(first.get_ydata()) == pytest.approx([1 / 3, 2 / 3, 1])
        assert list(e2el.get_lines()[0].get_xdata()) == pytest.approx([200, 400, 600])
        by_label = {line.get_label(): line for line in throughput.get_lines()}
        assert list(by_label["dvd"].get_xdata()) == [1, 4]
        assert list(by_label["dvd"].get_ydata()) == [5.0, 12.0]
        assert list(by_label["coupled"].get_ydata()) == [7.0]
    finally:
        plt.close(fig)
    single = benchmark.latency_figure([_run_record("dvd", 4, [0.1], 1.0)])
    try:
        assert len(single.axes) == 2  # no throughput panel for one concurrency
        assert [line.get_label() for line in single.axes[0].get_lines()] == ["dvd"]
    finally:
        plt.close(single)


def test_arrivals():
    assert benchmark.arrival_gaps(5, float("inf"), 1.0, 0) == [0.0] * 5
    gaps = benchmark.arrival_gaps(4000, 10.0, 1.0, 0)
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.1)  # Poisson at 10 requests/s
    bursty = benchmark.arrival_gaps(4000, 10.0, 0.25, 0)
    assert np.mean(bursty) == pytest.approx(0.1, rel=0.15) and np.std(bursty) > 1.5 * np.std(gaps)


def run_client(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_benchmark_against_the_served_model(stacks, tmp_path):
    outputs = []
    for name in ("flash", "coupled"):
        output = tmp_path / f"{name}.json"
        result = run_client(
            "clients/benchmark.py", "run",
            "--base-url", stacks[name].base_url,
            "--model", "dvd-tiny-internvl",
            "--num-requests", "24", "--concurrency", "4",
            "--max-tiles", "2", "--output-len", "8", "--ignore-eos",
            "--label", name, "--output", str(output),
            "--plot", str(tmp_path / f"{name}.png"), "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr + result.stdout
        outputs.append(output)
        record = json.loads(output.read_text())
        metrics = record["metrics"]
        assert metrics["completed"] == 24 and metrics["failed"] == 0
        assert metrics["completed"] + metrics["failed"] == len(record["requests"]) == 24
        assert metrics["request_throughput"] == pytest.approx(
            metrics["completed"] / metrics["duration_s"]
        )
        assert metrics["output_throughput"] == pytest.approx(
            metrics["total_output_tokens"] / metrics["duration_s"]
        )
        assert metrics["total_output_tokens"] == 24 * 8  # fixed lengths
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            summary = metrics[key]
            assert 0 < summary["median"] <= summary["p90"] <= summary["p99"], key
        assert metrics["ttft_ms"]["mean"] < metrics["e2el_ms"]["mean"]
        assert metrics["image_tokens_per_request"]["mean"] > 0
        with Image.open(io.BytesIO((tmp_path / f"{name}.png").read_bytes())) as plot:
            pixels = np.asarray(plot.convert("L"), dtype=np.float32)
            assert plot.width > 100 and pixels.std() > 5  # drawn on, not a blank canvas
    compared = run_client(
        "clients/benchmark.py", "compare", *map(str, outputs), "--plot", str(tmp_path / "cmp.png")
    )
    assert compared.returncode == 0, compared.stderr
    assert "| request throughput (/s) |" in compared.stdout and "x)" in compared.stdout
    with Image.open(tmp_path / "cmp.png") as plot:
        assert np.asarray(plot.convert("L"), dtype=np.float32).std() > 5


@pytest.mark.slow
def test_multi_turn_benchmark_against_the_served_model(stacks, tmp_path):
    """Three 3-turn conversations about fresh images: from turn 2 on, the vision service
    serves every image from its cache and vLLM reuses the history's KV blocks."""
    output = tmp_path / "multi-turn.json"
    result = run_client(
        "clients/benchmark.py", "run",
        "--base-url", stacks["flash"].base_url,
        "--dataset", "multi-turn", "--turns", "3", "--seed", "7",
        "--num-requests", "3", "--warmup", "0", "--concurrency", "2",
        "--max-tiles", "2", "--output-len", "4", "--ignore-eos",
        "--label", "multi-turn", "--output", str(output), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    metrics = json.loads(output.read_text())["metrics"]
    assert metrics["completed"] == 9 and metrics["failed"] == 0
    by_turn = metrics["by_turn"]
    assert [by_turn[t]["requests"] for t in ("1", "2", "3")] == [3, 3, 3]
    assert by_turn["1"]["cached_images"] == 0
    assert by_turn["2"]["cached_images"] == by_turn["3"]["cached_images"] == 3
    assert by_turn["2"]["cached_tokens_mean"] > 0 and by_turn["3"]["cached_tokens_mean"] > 0
    assert "TTFT turns 2+ / turn 1" in result.stdout


@pytest.mark.slow
def test_chat_client_streams_an_answer(stacks, tmp_path):
    """The client prints the server's greedy answer to its question about its image: the
    answer the same request gets from the API (up to the first near tie, margins.py: the
    second of the two requests takes its prompt from the prefix cache)."""
    image = tmp_path / "photo.png"
    noise_image(300, 200, seed=5).save(image)
    question = "What is in this picture?"
    result = run_client(
        "clients/chat.py", "--base-url", f"{stacks['hf'].base_url}/v1", "--image", str(image),
        "--max-tokens", "8", question,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    url = f"data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    body = {
        "model": "dvd-tiny-internvl",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        "return_token_ids": True,
        **MARGIN_PARAMS,
    }
    reply = httpx.post(f"{stacks['hf'].base_url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["message"]["content"]
    printed = result.stdout.removesuffix("\n")
    margins = served_margins(choice)
    sharp = next((i for i, m in enumerate(margins) if m < MARGIN_BOUND), len(margins))
    if sharp == len(margins):
        assert printed == choice["message"]["content"]
    else:  # the text of the tokens before the near tie
        entries = choice["logprobs"]["content"][:sharp]
        prefix = b"".join(bytes(entry["bytes"]) for entry in entries)
        assert printed.startswith(prefix.decode("utf-8", errors="ignore")), (sharp, margins)
