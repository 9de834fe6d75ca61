"""Load generator for OpenAI-compatible chat endpoints (DvD in either mode, or `vllm serve`).

    python clients/benchmark.py run --base-url http://127.0.0.1:8000 --model dvd-tiny-internvl \\
        --num-requests 64 --concurrency 8 --output results.json --plot results.png
    python clients/benchmark.py compare coupled.json dvd.json --plot compare.png

It speaks only the public HTTP API (streaming chat completions) and measures what
``vllm bench serve`` measures: time to first token (TTFT), time per output token (TPOT),
inter-token latency (ITL), end-to-end latency (E2EL) — mean, median, p90, p99 — request
throughput, output and total token throughput, completed/failed counts, plus the image
and video tokens per request that the server reports.

Multi-turn chats (``--dataset multi-turn``, or ``--turns N`` with any dataset): each
conversation sends its turns one after the other, each with the whole history so far (the
image, the earlier questions and the model's streamed answers), and holds one concurrency
slot for all of them, like a user waiting for each answer. TTFT is then also reported per
turn index, with the prompt tokens the server says it took from its prefix cache
(``usage.prompt_tokens_details.cached_tokens``) and the images its vision service served
from its embedding cache (``vision.cached_images``, a DvD extension).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

try:  # `python clients/benchmark.py` from a checkout, or the installed `dvd-bench`
    from clients import datasets
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from clients import datasets


@dataclass
class RequestResult:
    success: bool
    error: str = ""
    ttft_s: float = 0.0
    e2el_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server's prefix cache held
    cached_images: int = 0  # images served from the vision service's embedding cache
    video_tokens: int = 0
    started_s: float = 0.0  # since the benchmark started
    turn: int = 0  # 1, 2, ... in a multi-turn conversation; 0: a single-turn request
    conversation: int = -1
    answer: str = ""  # the streamed text (sent back as history in the next turn)
    # The server's Server-Timing header: milliseconds per stage known before the first byte
    # (body, admission, media, vision, vision.queue; named as the server's trace spans).
    server_timing_ms: dict[str, float] = field(default_factory=dict)

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


# ---- one request ------------------------------------------------------------------------


def parse_server_timing(value: str) -> dict[str, float]:
    """The ``dur`` of each metric of a ``Server-Timing`` header (milliseconds), by name; a
    metric without one is left out, a name met twice adds up."""
    durations: dict[str, float] = {}
    for metric in value.split(","):
        name, *params = (piece.strip() for piece in metric.split(";"))
        for param in params:
            key, _, raw = param.partition("=")
            if key.strip().lower() != "dur" or not name:
                continue
            with contextlib.suppress(ValueError):
                durations[name] = durations.get(name, 0.0) + float(raw.strip().strip('"'))
    return durations


async def send(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    request: datasets.BenchRequest,
    ignore_eos: bool,
    extra_body: dict[str, Any],
    origin: float,
) -> RequestResult:
    """Stream one chat completion and time its chunks."""
    body: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra_body,
    }
    if ignore_eos:  # fixed output lengths, as `vllm bench serve --ignore-eos` (vLLM extension)
        body["min_tokens"] = request.max_tokens
    result = RequestResult(success=False)
    started = time.perf_counter()
    result.started_s = started - origin
    last = started
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            result.server_timing_ms = parse_server_timing(response.headers.get("server-timing", ""))
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    result.output_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    result.image_tokens = details.get("image_tokens") or 0
                    result.video_tokens = details.get("video_tokens") or 0
                    result.cached_tokens = details.get("cached_tokens") or 0
                if chunk.get("vision"):
                    result.cached_images = chunk["vision"].get("cached_images") or 0
                choices = chunk.get("choices") or []
                result.answer += "".join(
                    (c.get("delta") or {}).get("content") or ""
                    for c in choices
                    if c.get("index", 0) == 0
                )
                if any((c.get("delta") or {}).get("content") for c in choices):
                    now = time.perf_counter()
                    if result.ttft_s == 0.0:
                        result.ttft_s = now - started
                    else:
                        result.itl_s.append(now - last)
                    last = now
        result.e2el_s = time.perf_counter() - started
        result.success = result.ttft_s > 0.0
        if not result.success:
            result.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def converse(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    request: datasets.BenchRequest,
    ignore_eos: bool,
    extra_body: dict[str, Any],
    origin: float,
) -> list[RequestResult]:
    """One request, or a conversation: the opening request, then each follow-up question
    with the whole history (the answers as the server streamed them)."""
    messages = list(request.messages)
    results: list[RequestResult] = []
    for turn in range(1 + len(request.follow_ups)):
        if turn:
            messages = [
                *messages,
                {"role": "assistant", "content": results[-1].answer},
                {"role": "user", "content": request.follow_ups[turn - 1]},
            ]
        step = datasets.BenchRequest(messages, request.max_tokens, request.num_images)
        result = await send(client, url, model, step, ignore_eos, extra_body, origin)
        if request.follow_ups:
            result.turn = turn + 1
        results.append(result)
        if not result.success:
            break  # the rest of the conversation cannot be sent
    return results


# ---- the run ----------------------------------------------------------------------------


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps between request arrivals: Poisson (burstiness 1) or gamma-distributed; rate inf
    sends everything at once (the concurrency limit still applies)."""
    if math.isinf(rate):
        return [0.0] * count
    rng = np.random.default_rng(seed)
    theta = 1.0 / (rate * burstiness)
    return list(rng.gamma(shape=burstiness, scale=theta, size=count))


async def run_load(
    args: argparse.Namespace, requests: list[datasets.BenchRequest]
) -> tuple[list[RequestResult], float]:
    url = f"{args.base_url.rstrip('/')}/v1/chat/completions"
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    extra = json.loads(args.extra_body) if args.extra_body else {}
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as client:
        for request in requests[: args.warmup]:  # not measured
            await converse(
                client, url, args.model, request, args.ignore_eos, extra, time.perf_counter()
            )
        semaphore = asyncio.Semaphore(args.concurrency)
        measured = requests[args.warmup :]
        progress = _progress(sum(1 + len(r.follow_ups) for r in measured), args.quiet)
        origin = time.perf_counter()

        async def one(index: int, request: datasets.BenchRequest) -> list[RequestResult]:
            async with semaphore:  # a conversation holds its slot for all its turns
                results = await converse(
                    client, url, args.model, request, args.ignore_eos, extra, origin
                )
            for result in results:
                result.conversation = index if request.follow_ups else -1
            progress.update(1 + len(request.follow_ups))
            return results

        tasks = []
        for index, (request, gap) in enumerate(
            zip(
                measured,
                arrival_gaps(len(measured), args.request_rate, args.burstiness, args.seed),
                strict=True,
            )
        ):
            tasks.append(asyncio.create_task(one(index, request)))
            if gap:
                await asyncio.sleep(gap)
        conversations = await asyncio.gather(*tasks)
        duration = time.perf_counter() - origin
        progress.close()
    return [result for results in conversations for result in results], duration


def _progress(total: int, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=quiet, desc="requests", unit="req")


# ---- metrics ----------------------------------------------------------------------------


def summarize(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean/median/p90/p99/std of ``values`` (seconds), in milliseconds by default."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0, "std": 0.0}
    array = np.asarray(values, dtype=np.float64) * scale
    return {
        "mean": float(array.mean()),
        "median": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
        "std": float(array.std()),
    }


def compute_metrics(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    done = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    return {
        "duration_s": duration_s,
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "request_throughput": len(done) / duration_s if duration_s else 0.0,
        "output_throughput": output_tokens / duration_s if duration_s else 0.0,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s
        if duration_s
        else 0.0,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": prompt_tokens,
        "ttft_ms": summarize([r.ttft_s for r in done]),
        "tpot_ms": summarize(tpots),
        "itl_ms": summarize([gap for r in done for gap in r.itl_s]),
        "e2el_ms": summarize([r.e2el_s for r in done]),
        "image_tokens_per_request": summarize([float(r.image_tokens) for r in done], scale=1.0),
        "cached_tokens_per_request": summarize([float(r.cached_tokens) for r in done], scale=1.0),
        "cached_images": sum(r.cached_images for r in done),
        "by_turn": turn_metrics(done),
        "video_tokens_per_request": summarize([float(r.video_tokens) for r in done], scale=1.0),
        "stages_ms": stage_metrics(done),
        "errors": sorted({r.error for r in results if not r.success})[:10],
    }


def stage_metrics(done: list[RequestResult]) -> dict[str, dict[str, float]]:
    """Per Server-Timing stage (in the order the server names them), its durations over the
    requests that reported it, in milliseconds."""
    names = list(dict.fromkeys(name for r in done for name in r.server_timing_ms))
    return {
        name: summarize([r.server_timing_ms[name] for r in done if name in r.server_timing_ms], 1.0)
        for name in names
    }


def turn_metrics(done: list[RequestResult]) -> dict[str, dict[str, Any]]:
    """Per turn index of multi-turn conversations (empty for single-turn runs): how many
    requests, their TTFT, and what the server took from its caches."""
    by_turn: dict[str, dict[str, Any]] = {}
    for turn in sorted({r.turn for r in done if r.turn}):
        at_turn = [r for r in done if r.turn == turn]
        by_turn[str(turn)] = {
            "requests": len(at_turn),
            "ttft_ms": summarize([r.ttft_s for r in at_turn]),
            "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in at_turn])),
            "cached_tokens_mean": float(np.mean([r.cached_tokens for r in at_turn])),
            "cached_images": sum(r.cached_images for r in at_turn),
            "images": sum(1 for r in at_turn if r.image_tokens),
        }
    return by_turn


def later_turns_ratio(metrics: dict[str, Any]) -> float | None:
    """Mean TTFT of turns 2 and later over the mean TTFT of turn 1 (None: single-turn)."""
    by_turn = metrics.get("by_turn") or {}
    first = by_turn.get("1")
    later = [entry for turn, entry in by_turn.items() if turn != "1"]
    if not first or not later or not first["ttft_ms"]["mean"]:
        return None
    total = sum(entry["ttft_ms"]["mean"] * entry["requests"] for entry in later)
    mean_later = total / sum(entry["requests"] for entry in later)
    return float(mean_later / first["ttft_ms"]["mean"])


def print_report(label: str, metrics: dict[str, Any]) -> None:
    lines = [
        f"=== {label} ===",
        f"completed / failed       {metrics['completed']} / {metrics['failed']}",
        f"duration (s)             {metrics['duration_s']:.2f}",
        f"request throughput (/s)  {metrics['request_throughput']:.3f}",
        f"output tokens (/s)       {metrics['output_throughput']:.1f}",
        f"total tokens (/s)        {metrics['total_token_throughput']:.1f}",
    ]
    for key, title in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("e2el_ms", "E2EL"),
    ):
        m = metrics[key]
        lines.append(
            f"{title:<5} ms  mean {m['mean']:8.1f}  median {m['median']:8.1f}  "
            f"p90 {m['p90']:8.1f}  p99 {m['p99']:8.1f}"
        )
    for name, m in (metrics.get("stages_ms") or {}).items():
        lines.append(f"  {name:<14} ms  median {m['median']:8.1f}  p99 {m['p99']:8.1f}")
    lines.append(f"image tokens / request   {metrics['image_tokens_per_request']['mean']:.0f}")
    if "video_tokens_per_request" in metrics:
        video_tokens = metrics["video_tokens_per_request"]["mean"]
        lines.append(f"video tokens / request   {video_tokens:.0f}")
    for turn, entry in (metrics.get("by_turn") or {}).items():
        lines.append(
            f"turn {turn:<3} TTFT ms  mean {entry['ttft_ms']['mean']:8.1f}  median "
            f"{entry['ttft_ms']['median']:8.1f}  cached tokens {entry['cached_tokens_mean']:7.0f}"
            f" / {entry['prompt_tokens_mean']:.0f}  cached images {entry['cached_images']}"
            f" / {entry['images']}"
        )
    ratio = later_turns_ratio(metrics)
    if ratio is not None:
        lines.append(f"TTFT turns 2+ / turn 1   {ratio:.3f}")
    for error in metrics["errors"]:
        lines.append(f"error: {error}")
    print("\n".join(lines))


# ---- plots ------------------------------------------------------------------------------


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    data = np.sort(np.asarray(values) * 1000)
    ax.plot(data, np.arange(1, len(data) + 1) / len(data), label=label)


def plot_runs(runs: list[dict[str, Any]], path: Path) -> None:
    """Write ``latency_figure(runs)`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = latency_figure(runs)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_figure(runs: list[dict[str, Any]]) -> Any:
    """Latency CDFs (TTFT, E2EL) for each run; throughput vs concurrency when runs differ in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = {run["config"]["concurrency"] for run in runs}
    panels = 3 if len(concurrencies) > 1 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for run in runs:
        label = run["config"]["label"]
        if panels == 3:
            label += f" c={run['config']['concurrency']}"
        requests = [r for r in run["requests"] if r["success"]]
        _cdf(axes[0], [r["ttft_s"] for r in requests], label)
        _cdf(axes[1], [r["e2el_s"] for r in requests], label)
    for ax, title in zip(axes[:2], ("TTFT", "End-to-end latency"), strict=True):
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if panels == 3:
        by_label: dict[str, list[tuple[int, float]]] = {}
        for run in runs:
            by_label.setdefault(run["config"]["label"], []).append(
                (run["config"]["concurrency"], run["metrics"]["request_throughput"])
            )
        for label, points in by_label.items():
            points.sort()
            axes[2].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axes[2].set_title("Request throughput vs concurrency")
        axes[2].set_xlabel("concurrency")
        axes[2].set_ylabel("requests / s")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---- commands ---------------------------------------------------------------------------


def command_run(args: argparse.Namespace) -> int:
    options = datasets.SyntheticOptions(
        num_requests=args.num_requests + args.warmup,
        images_per_request=args.images_per_request,
        min_tiles=args.min_tiles,
        max_tiles=args.max_tiles,
        dense_fraction=args.dense_fraction,
        prompt_words=args.prompt_len,
        output_len=args.output_len,
        seed=args.seed,
        turns=args.turns or (4 if args.dataset == "multi-turn" else 1),
        video_frames=args.video_frames,
    )
    requests = datasets.load(args.dataset, options)
    warm, measured = requests[: args.warmup], requests[args.warmup :]
    random.Random(args.seed).shuffle(measured)
    results, duration = asyncio.run(run_load(args, warm + measured))
    metrics = compute_metrics(results, duration)
    label = args.label or f"{args.model}@{args.base_url}"
    print_report(label, metrics)
    record = {
        "config": {**{k: v for k, v in vars(args).items() if k != "func"}, "label": label},
        "metrics": metrics,
        "requests": [
            {k: v for k, v in asdict(r).items() if k not in ("itl_s", "answer")} for r in results
        ],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2, default=str))
    if args.plot:
        plot_runs([record], Path(args.plot))
    return 0 if metrics["completed"] else 1


def compare_table(runs: list[dict[str, Any]]) -> str:
    """Runs side by side; ratios are relative to the first run."""
    base = runs[0]["metrics"]
    rows = [
        ("request throughput (/s)", "request_throughput", None, True),
        ("output tokens (/s)", "output_throughput", None, True),
        ("total tokens (/s)", "total_token_throughput", None, True),
        ("TTFT mean (ms)", "ttft_ms", "mean", False),
        ("TTFT p50 (ms)", "ttft_ms", "median", False),
        ("TTFT p99 (ms)", "ttft_ms", "p99", False),
        ("TPOT mean (ms)", "tpot_ms", "mean", False),
        ("ITL p99 (ms)", "itl_ms", "p99", False),
        ("E2EL p50 (ms)", "e2el_ms", "median", False),
        ("E2EL p99 (ms)", "e2el_ms", "p99", False),
        ("image tokens / request", "image_tokens_per_request", "mean", None),
        ("video tokens / request", "video_tokens_per_request", "mean", None),
        ("completed", "completed", None, None),
        ("failed", "failed", None, None),
    ]
    labels = [run["config"]["label"] for run in runs]
    header = "| metric | " + " | ".join(labels) + " |"
    out = [header, "|" + "---|" * (len(labels) + 1)]
    for title, key, sub, _higher_is_better in rows:
        cells = []
        if any(key not in run["metrics"] for run in runs):
            continue  # results written before the metric existed
        for index, run in enumerate(runs):
            value = run["metrics"][key] if sub is None else run["metrics"][key][sub]
            reference = base[key] if sub is None else base[key][sub]
            cell = (
                f"{value:.3f}"
                if isinstance(value, float) and value < 100
                else f"{value:.0f}"
                if isinstance(value, float)
                else str(value)
            )
            if index and isinstance(value, float) and reference:
                cell += f" ({value / reference:.2f}x)"
            cells.append(cell)
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    stages = list(dict.fromkeys(n for run in runs for n in run["metrics"].get("stages_ms") or {}))
    for name in stages:
        for sub, title in (("median", "p50"), ("p99", "p99")):
            cells = []
            for run in runs:
                entry = (run["metrics"].get("stages_ms") or {}).get(name)
                cells.append("-" if entry is None else f"{entry[sub]:.1f}")
            out.append(f"| {name} {title} (ms, Server-Timing) | " + " | ".join(cells) + " |")
    turns = sorted({int(t) for run in runs for t in (run["metrics"].get("by_turn") or {})})
    for turn in turns:
        cells = []
        for run in runs:
            entry = (run["metrics"].get("by_turn") or {}).get(str(turn))
            cells.append(
                "-"
                if entry is None
                else f"{entry['ttft_ms']['mean']:.0f} ({entry['cached_tokens_mean']:.0f} cached, "
                f"{entry['cached_images']}/{entry['images']} images)"
            )
        out.append(f"| TTFT mean, turn {turn} (ms) | " + " | ".join(cells) + " |")
    if turns:
        ratios = [later_turns_ratio(run["metrics"]) for run in runs]
        cells = ["-" if ratio is None else f"{ratio:.3f}" for ratio in ratios]
        out.append("| TTFT turns 2+ / turn 1 | " + " | ".join(cells) + " |")
    return "\n".join(out)


def command_compare(args: argparse.Namespace) -> int:
    runs = [json.loads(Path(path).read_text()) for path in args.results]
    print(compare_table(runs))
    if args.plot:
        plot_runs(runs, Path(args.plot))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="send a workload and measure it")
    run.add_argument("--base-url", default="http://127.0.0.1:8000")
    run.add_argument("--model", default="dvd-tiny-internvl")
    run.add_argument("--api-key", default=None)
    run.add_argument("--label", default=None, help="name of this run in reports and plots")
    run.add_argument("--num-requests", type=int, default=64)
    run.add_argument("--concurrency", type=int, default=8, help="most requests in flight")
    run.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)"
    )
    run.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)"
    )
    run.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic | synthetic-video | multi-turn | folder:PATH | jsonl:PATH",
    )
    run.add_argument(
        "--video-frames",
        type=int,
        default=64,
        help="synthetic-video: frames of each video (the server samples num_frames of them)",
    )
    run.add_argument(
        "--turns",
        type=int,
        default=None,
        help="user turns per conversation, each re-sending the history (default: 4 for "
        "multi-turn, else 1); --num-requests and --warmup count conversations",
    )
    run.add_argument("--images-per-request", type=int, default=1)
    run.add_argument("--min-tiles", type=int, default=1, help="synthetic images: fewest tiles")
    run.add_argument("--max-tiles", type=int, default=12, help="synthetic images: most tiles")
    run.add_argument(
        "--dense-fraction", type=float, default=0.5, help="synthetic: share of text-like regions"
    )
    run.add_argument("--prompt-len", type=int, default=32, help="words of text per prompt")
    run.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    run.add_argument("--ignore-eos", action="store_true", help="fixed output lengths (min_tokens)")
    run.add_argument(
        "--extra-body", default=None, help='JSON merged into each request, e.g. \'{"vir": "off"}\''
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--warmup", type=int, default=2, help="requests sent first and not measured")
    run.add_argument("--timeout", type=float, default=600.0)
    run.add_argument("--output", default=None, help="write results JSON here")
    run.add_argument("--plot", default=None, help="write latency plots (PNG) here")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=command_run)

    compare = commands.add_parser("compare", help="put result files side by side")
    compare.add_argument("results", nargs="+", help="results JSON files; ratios are vs the first")
    compare.add_argument("--plot", default=None, help="write comparison plots (PNG) here")
    compare.set_defaults(func=command_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
