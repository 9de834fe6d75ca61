"""vLLM's engine arguments on ``dvd-llm-server`` and ``dvd-serve``: vLLM's own parser, DvD's
settings for the arguments they overlap, the refused set, the help; and, on a running engine,
a representative set read back from vLLM's config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LLM_TEST_ENV, REPO_ROOT

from llm_server.engine.engine_args import (
    DVD_SETTINGS,
    REFUSED,
    EngineArgumentRefused,
    engine_arguments,
    parse_llm_command_line,
    settings_options,
    split_serve_command_line,
)
from llm_server.engine.language_model import cpu_kv_cache_size
from llm_server.launcher import ServeSettings
from llm_server.settings import LLMSettings

PROG = "dvd-llm-server"


@pytest.fixture(scope="module")
def engine():
    return engine_arguments(PROG)


@pytest.fixture(scope="module")
def own_options() -> set[str]:
    return settings_options(LLMSettings, PROG)[0]


@pytest.fixture(scope="module")
def vllm_parser():
    """vLLM's complete engine-argument parser, as ``vllm serve`` builds it."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(add_help=False))


def test_every_vllm_engine_argument_is_accepted_aliased_or_refused(engine, vllm_parser):
    kinds: dict[str, set[str]] = {"passed": set(), "dvd": set(), "refused": set()}
    for action in vllm_parser._actions:
        for option in action.option_strings:
            if option in engine.parser._option_string_actions:
                kinds["passed"].add(action.dest)
            elif option in engine.aliases:
                kinds["dvd"].add(action.dest)
            else:
                assert option in engine.refused, option
                kinds["refused"].add(action.dest)
    # Each argument is of exactly one kind; most are vLLM's to take.
    assert not (kinds["passed"] & kinds["dvd"]) and not (kinds["passed"] & kinds["refused"])
    assert kinds["dvd"] == set(DVD_SETTINGS)
    assert set(REFUSED) <= kinds["refused"]
    assert len(kinds["passed"]) > 150


def test_dvd_settings_name_real_fields_and_cover_every_shared_name(vllm_parser, own_options):
    assert set(DVD_SETTINGS.values()) <= set(LLMSettings.model_fields)
    # A vLLM argument under one of DvD's names must be in the table (its meaning checked):
    # a new vLLM argument that collides with a DvD flag fails here, not silently.
    shared = {
        action.dest
        for action in vllm_parser._actions
        if any(option in own_options for option in action.option_strings)
    }
    assert shared <= set(DVD_SETTINGS)


def test_vllm_spellings_of_dvd_settings_become_dvd_flags(engine, own_options):
    argv = [
        "-tp", "2", "--no-enable-prefix-caching", "--max_model_len=64",
        "--device-memory-utilization", "0.5", "--max-tiles", "4", "--seed", "-1",
    ]  # fmt: skip
    split = engine.split(argv, own_options)
    assert split.vllm == [] and split.dvd_engine == []
    assert split.own == [
        "--tensor-parallel-size", "2", "--no-prefix-caching", "--max-model-len=64",
        "--gpu-memory-utilization", "0.5", "--max-tiles", "4", "--seed", "-1",
    ]  # fmt: skip


def test_vllm_arguments_are_parsed_by_vllm(engine, own_options):
    argv = [
        "--kv-cache-dtype", "fp8", "--max_num_batched_tokens=512", "--enable-chunked-prefill",
        "--block-size", "32", "-q", "fp8", "--compilation-config.mode", "0", "-dp", "2",
        "--dtype", "float32", "--speculative-config", '{"method": "ngram"}',
    ]  # fmt: skip
    split = engine.split(argv, own_options)
    assert split.own == ["--dtype", "float32"]
    values = engine.parse(split.vllm)
    # Only what was given, with vLLM's types; the rest keeps vLLM's defaults.
    assert values["kv_cache_dtype"] == "fp8"
    assert values["max_num_batched_tokens"] == 512
    assert values["enable_chunked_prefill"] is True
    assert values["block_size"] == 32
    assert values["quantization"] == "fp8"
    assert values["data_parallel_size"] == 2
    assert values["speculative_config"] == {"method": "ngram"}
    assert int(values["compilation_config"].mode) == 0
    assert set(values) == {
        "kv_cache_dtype", "max_num_batched_tokens", "enable_chunked_prefill", "block_size",
        "quantization", "compilation_config", "speculative_config", "data_parallel_size",
    }  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["--tokenizer", "other"],
        ["--enable-prompt-embeds"],
        ["--no-enable-prompt-embeds"],
        ["--hf-config-path=/x"],
        ["--limit-mm-per-prompt", '{"image": 2}'],
        ["--runner", "pooling"],
    ],
)
def test_arguments_dvd_sets_are_refused_with_the_reason(engine, own_options, argv, capsys):
    with pytest.raises(EngineArgumentRefused, match="DvD sets this vLLM engine argument"):
        engine.split(argv, own_options)
    with pytest.raises(SystemExit) as exited:
        parse_llm_command_line(argv)
    assert exited.value.code == 2
    assert "DvD sets this vLLM engine argument itself" in capsys.readouterr().err


def test_unknown_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_llm_command_line(["--no-such-flag", "1"])
    assert exited.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_help_shows_dvd_flags_and_vllm_engine_arguments(engine, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_llm_command_line(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--vision-target" in text and "--max-images-per-request" in text  # DvD's
    assert "vLLM engine arguments: CacheConfig" in text
    kv_cache_dtype = engine.parser._option_string_actions["--kv-cache-dtype"]
    assert "--kv-cache-dtype" in text and kv_cache_dtype.help.split("\n")[0][:40] in text
    assert "-tp  ->  --tensor-parallel-size" in text  # the overlaps, and where they go
    assert "--tokenizer:" in text  # the refused set, with reasons


def test_dvd_serve_forwards_engine_arguments_to_the_language_service():
    own, forwarded = split_serve_command_line(
        ["--port", "0", "-tp", "2", "--max-model-len", "64", "--kv-cache-dtype", "fp8"],
        ServeSettings,
    )
    assert own == ["--port", "0"]
    assert forwarded == [
        "--tensor-parallel-size", "2", "--max-model-len", "64", "--kv-cache-dtype", "fp8",
    ]  # fmt: skip


# The representative set, all in one engine start. Not in it, because vLLM 0.32's CPU backend
# cannot run them: ``--quantization fp8`` (its fp8 quantization kernel is a stub on CPU:
# "_C::static_scaled_fp8_quant() expected at most 0 argument(s)") and
# ``--data-parallel-size 2`` (two engine cores and a coordinator process on a 2-core machine;
# the coordinator missed vLLM's 120 s start-up deadline). Both are parsed by vLLM's parser
# like the others (test_vllm_arguments_are_parsed_by_vllm).
REPRESENTATIVE = [
    "--kv-cache-dtype", "fp8", "--max-num-batched-tokens", "512", "--block-size", "32",
    "--enable-chunked-prefill", "-tp", "1", "--max-model-len", "1024", "--max-num-seqs", "8",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.processes  # a vLLM engine, in a process of its own
def test_engine_arguments_reach_the_running_engine(tiny_models, tmp_path: Path):
    """The command line, through the language service's app (settings, vLLM's parser, the
    engine's start), read back from the running engine's vLLM config."""
    argv = [
        "--model", str(tiny_models["hf"]), "--cache-dir", str(tmp_path),
        "--vision-target", "127.0.0.1:1", "--enforce-eager", *REPRESENTATIVE,
    ]  # fmt: skip
    probe = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "support" / "engine_config_probe.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env={**os.environ, **LLM_TEST_ENV},
    )
    lines = [line for line in probe.stdout.splitlines() if line.startswith("ENGINE_CONFIG ")]
    assert probe.returncode == 0 and lines, probe.stdout[-3000:] + probe.stderr[-6000:]
    config = json.loads(lines[-1].removeprefix("ENGINE_CONFIG "))
    assert config["kv_cache_dtype"] == "fp8"
    assert config["max_num_batched_tokens"] == 512
    assert config["block_size"] == 32
    assert config["enable_chunked_prefill"] is True
    # DvD's settings, given in vLLM's or DvD's spelling, and what DvD sets itself.
    assert config["dtype"] == "float32"  # DvD's auto: the checkpoint's own
    assert config["tensor_parallel_size"] == 1
    assert config["max_model_len"] == 1024
    assert config["max_num_seqs"] == 8
    assert config["enable_prefix_caching"] is True
    assert config["enable_prompt_embeds"] is True
    # --cpu-kv-cache-gib (LLM_TEST_ENV's DVD_CPU_KV_CACHE_GIB=0.25) sized the CPU KV cache.
    assert config["kv_cache_memory_bytes"] == 2**28


def test_cpu_kv_cache_size_gives_way_to_vllm_spellings(monkeypatch):
    """The setting becomes vLLM's kv_cache_memory_bytes, unless that argument was given or
    VLLM_CPU_KVCACHE_SPACE is set (vLLM applies the variable itself)."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    settings = LLMSettings(cpu_kv_cache_gib=0.5)
    assert cpu_kv_cache_size(settings, {}) == {"kv_cache_memory_bytes": 2**29}
    assert cpu_kv_cache_size(settings, {"kv_cache_memory_bytes": 123}) == {}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert cpu_kv_cache_size(settings, {}) == {}
