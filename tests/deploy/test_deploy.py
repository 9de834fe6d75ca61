"""The deployment files, proven without a Docker engine.

The compose test reads docker-compose.yml with its CPU override, and runs each service's
declared command with its declared environment as a local process (service host names mapped
to 127.0.0.1, container ports to free local ports, the /cache volume to a temporary folder),
waits on the declared health checks, and completes a chat request with an image through it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import (
    LLM_TEST_ENV,
    REPO_ROOT,
    ServerProcess,
    data_url,
    grpc_serving,
    noise_image,
)

from llm_server.launcher import ServeSettings
from llm_server.server import unauthenticated_exposure
from llm_server.settings import LLMSettings

BIN = Path(sys.executable).parent


# ---- compose files ------------------------------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: ``!reset`` removes a value, ``!override`` replaces it."""


class _Reset:
    pass


class _Override:
    def __init__(self, value: Any) -> None:
        self.value = value


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
_ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: _Override(
        loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node, deep=True)
    ),
)


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge: mappings merge key by key, other values are replaced."""
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value)
        return merged
    return override


_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in files:
        document = yaml.load((REPO_ROOT / name).read_text(), Loader=_ComposeLoader)  # noqa: S506
        merged = _merge(merged, document)
    merged = _interpolate(merged, env or {})
    return merged


def test_compose_gpu_file_is_what_operators_expect():
    compose = load_compose("docker-compose.yml")
    vision, llm = compose["services"]["vision"], compose["services"]["llm"]
    for service in (vision, llm):
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert service["restart"] == "unless-stopped"
        assert "model-cache:/cache" in service["volumes"]
        assert (
            service["environment"]["DVD_MODEL"]
            == compose["services"]["llm"]["environment"]["DVD_MODEL"]
        )
        assert service["healthcheck"]["test"][0] == "CMD"
    assert vision["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]
    assert llm["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    # Scalable: no fixed name or host port on the vision service; replicas found by DNS.
    assert "container_name" not in vision and "ports" not in vision
    assert "--vision-target=dns:///vision:50051" in llm["command"]
    assert any(arg.startswith("--tensor-parallel-size=") for arg in llm["command"])
    assert llm["depends_on"] == {"vision": {"condition": "service_healthy"}}
    assert "--grpc" in vision["healthcheck"]["test"] and "--http" in llm["healthcheck"]["test"]
    assert "model-cache" in compose["volumes"]
    # One IPC namespace, so embeddings can go through shared memory on this node.
    assert vision["ipc"] == "shareable" and llm["ipc"] == "service:vision"
    assert vision["shm_size"]
    tuned = load_compose(
        "docker-compose.yml", env={"DVD_MODEL": "org/model", "DVD_TENSOR_PARALLEL_SIZE": "2"}
    )
    assert tuned["services"]["vision"]["environment"]["DVD_MODEL"] == "org/model"
    assert "--tensor-parallel-size=2" in tuned["services"]["llm"]["command"]


def compose_llm_settings(service: dict[str, Any]) -> LLMSettings:
    """The language service's settings as its container reads them: its DVD_* variables
    (empty ones mean unset), then its flags."""
    values: dict[str, Any] = {
        name.removeprefix("DVD_").lower(): value
        for name, value in service["environment"].items()
        if name.startswith("DVD_") and value != ""
    }
    for arg in service["command"][1:]:
        name, equals, value = arg.removeprefix("--").partition("=")
        values[name.replace("-", "_")] = value if equals else True
    # model_validate, not the constructor: this process's own DVD_* variables must not count.
    return LLMSettings.model_validate(values)


@pytest.mark.parametrize(
    "files",
    [
        ("docker-compose.yml",),
        ("docker-compose.yml", "docker-compose.cpu.yml"),
        ("docker-compose.yml", "docker-compose.single-gpu.yml"),
    ],
)
def test_compose_serves_the_api_on_loopback_without_a_key(files):
    """In its container the language service listens on 0.0.0.0, which it refuses without a
    key; compose lets it (DVD_ALLOW_UNAUTHENTICATED) and publishes the port on this host's
    loopback only. Publishing it further goes with a key, which /v1 then requires."""
    llm = load_compose(*files, env={})["services"]["llm"]
    host_address, host_port, container_port = llm["ports"][0].split(":")
    assert (host_address, host_port, container_port) == ("127.0.0.1", "8000", "8000")
    settings = compose_llm_settings(llm)
    assert settings.host == "0.0.0.0" and settings.api_key is None
    assert settings.allow_unauthenticated and unauthenticated_exposure(settings) is None
    assert "DVD_API_KEY" not in load_compose(*files, env={})["services"]["vision"]["environment"]

    strict = load_compose(*files, env={"DVD_ALLOW_UNAUTHENTICATED": "false"})["services"]["llm"]
    assert unauthenticated_exposure(compose_llm_settings(strict)) is not None
    published = load_compose(*files, env={"DVD_API_KEY": "sk-1", "DVD_HTTP_ADDRESS": "0.0.0.0"})
    llm = published["services"]["llm"]
    assert llm["ports"][0] == "0.0.0.0:8000:8000"
    settings = compose_llm_settings(llm)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "sk-1"


def test_make_serve_needs_no_key():
    """`make serve` (dvd-serve) listens on 127.0.0.1: no key, and the check lets it start."""
    host = ServeSettings.model_validate({}).host
    assert host == "127.0.0.1"
    assert unauthenticated_exposure(LLMSettings.model_validate({"host": host})) is None
    for loopback in ("localhost", "127.0.0.3", "::1"):
        assert unauthenticated_exposure(LLMSettings.model_validate({"host": loopback})) is None
    for exposed in ("0.0.0.0", "::", "10.1.2.3", "", "llm.internal"):
        assert unauthenticated_exposure(LLMSettings.model_validate({"host": exposed})), exposed


def test_compose_variants():
    cpu = load_compose("docker-compose.yml", "docker-compose.cpu.yml")
    for name in ("vision", "llm"):
        service = cpu["services"][name]
        assert "deploy" not in service  # no GPU reservation
        assert service["build"]["target"] == "cpu"
        assert service["environment"]["DVD_MODEL"] == ""  # empty: the tiny model
    assert cpu["services"]["llm"]["ipc"] == "service:vision"
    single = load_compose("docker-compose.yml", "docker-compose.single-gpu.yml")
    gpus = [
        single["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        for name in ("vision", "llm")
    ]
    assert gpus[0] == gpus[1] and len(gpus[0]) == 1 and gpus[0][0]["device_ids"] == ["0"]
    assert "--gpu-memory-utilization=0.7" in single["services"]["llm"]["command"]


# ---- running the declared services as local processes ------------------------------------


class LocalDeployment:
    """Maps a compose service's declared command and environment onto this machine."""

    def __init__(self, tmp: Path, hosts: dict[str, str], ports: dict[int, int]) -> None:
        self.tmp = tmp
        self.hosts = hosts
        self.ports = ports

    def translate(self, text: str) -> str:
        text = text.replace("/cache", str(self.tmp / "cache"))
        text = text.replace("0.0.0.0", "127.0.0.1")
        for name, address in self.hosts.items():
            text = re.sub(rf"(?<=//){name}(?=:)|^{name}(?=:)", address, text)
        return re.sub(
            r"(?<=[:=])(\d{4,5})\b",
            lambda m: str(self.ports.get(int(m.group(1)), m.group(1))),
            text,
        )

    def argv(self, command: list[str]) -> list[str]:
        translated = [self.translate(arg) for arg in command]
        return [str(BIN / translated[0]), *translated[1:]]

    def environment(self, service: dict[str, Any]) -> dict[str, str]:
        declared = {k: self.translate(str(v)) for k, v in service.get("environment", {}).items()}
        return {**declared, "HOME": os.environ.get("HOME", str(self.tmp)), **LLM_TEST_ENV}

    def healthy(self, service: dict[str, Any]) -> bool:
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        timeout = float(service["healthcheck"]["timeout"].rstrip("s"))
        result = subprocess.run(
            self.argv(test[1:]), capture_output=True, timeout=timeout + 5, check=False
        )
        return result.returncode == 0


def _seconds(value: str) -> float:
    return float(value.rstrip("s"))


@pytest.mark.slow
@pytest.mark.processes
def test_cpu_compose_services_run_as_declared(tmp_path, log_dir):
    compose = load_compose("docker-compose.yml", "docker-compose.cpu.yml", env={})
    vision, llm = compose["services"]["vision"], compose["services"]["llm"]
    # Container ports -> 0 (each service binds a free one and reports it); once a service
    # has, its ports map to the ones it bound, for the health checks and the services after it.
    deployment = LocalDeployment(
        tmp_path,
        hosts={"vision": "127.0.0.1", "llm": "127.0.0.1"},
        ports={50051: 0, 8000: 0, 9400: 0},
    )
    started: list[ServerProcess] = []
    try:
        vision_process = ServerProcess(
            "compose-vision",
            deployment.argv(vision["command"]),
            log_dir,
            env=deployment.environment(vision),
            report_ports=True,
        )
        started.append(vision_process)
        bound = vision_process.reported_ports(_seconds(vision["healthcheck"]["start_period"]))
        deployment.ports |= {50051: bound["port"], 9400: bound["metrics_port"]}
        vision_process.wait_until(
            lambda: deployment.healthy(vision),
            _seconds(vision["healthcheck"]["start_period"]),
            "healthy",
        )
        # depends_on: condition service_healthy -> the language service starts only now.
        assert llm["depends_on"]["vision"]["condition"] == "service_healthy"
        llm_process = ServerProcess(
            "compose-llm",
            deployment.argv(llm["command"]),
            log_dir,
            env=deployment.environment(llm),
            report_ports=True,
        )
        started.append(llm_process)
        bound = llm_process.reported_ports(_seconds(llm["healthcheck"]["start_period"]))
        deployment.ports[8000] = bound["port"]
        llm_process.wait_until(
            lambda: deployment.healthy(llm), _seconds(llm["healthcheck"]["start_period"]), "healthy"
        )
        # The published port of the llm service is where clients call.
        published = llm["ports"][0].split(":")
        base_url = f"http://127.0.0.1:{deployment.ports[int(published[-1])]}"
        models = httpx.get(f"{base_url}/v1/models", timeout=30).json()
        model = models["data"][0]["id"]
        assert model == "dvd-tiny-internvl"  # DVD_MODEL empty: the generated tiny model
        reply = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={
                "model": model,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": data_url(noise_image(640, 480, 3))},
                            },
                            {"type": "text", "text": "What is this?"},
                        ],
                    }
                ],
                "max_tokens": 8,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
        assert reply.json()["vision"]["vir"] == "auto"  # the tiny default is a Flash model
        assert (tmp_path / "cache" / "dvd").is_dir()  # the model cache volume was used
    finally:
        for process in reversed(started):
            process.stop()


@pytest.mark.slow
@pytest.mark.processes
def test_two_vision_replicas_behind_one_target(tiny_models, log_dir):
    """Requests spread over both replicas; when one dies, the other serves without errors."""
    replicas = []
    metrics_ports = []
    llm = None
    try:
        for address in ("127.0.0.1", "127.0.0.2"):
            replicas.append(
                ServerProcess(
                    f"replica-{address}",
                    [
                        str(BIN / "dvd-vision-server"),
                        "--model",
                        str(tiny_models["hf"]),
                        f"--host={address}",
                        "--port=0",
                        "--metrics-port=0",
                    ],  # fmt: skip
                    log_dir,
                    report_ports=True,
                )
            )
        targets = []
        for replica in replicas:
            bound = replica.reported_ports(120)
            targets.append(f"{bound['host']}:{bound['port']}")
            metrics_ports.append(bound["metrics_port"])
            replica.wait_until(lambda t=targets[-1]: grpc_serving(t), 120, "serving")
        # What dns:///vision:50051 resolves to in Compose or Kubernetes: every replica's address
        # (here each replica on a port of its own).
        target = "ipv4:" + ",".join(targets)
        llm = ServerProcess(
            "replicas-llm",
            [
                str(BIN / "dvd-llm-server"),
                "--model",
                str(tiny_models["hf"]),
                "--port=0",
                f"--vision-target={target}",
                # The even spread checked below is round robin's; affinity placement is
                # tests/integration/test_vision_fleet.py's.
                "--vision-balancing=round_robin",
                "--enforce-eager",
                "--served-model-name=m",
            ],  # fmt: skip
            log_dir,
            env=LLM_TEST_ENV,
            report_ports=True,
        )
        base_url = f"http://127.0.0.1:{llm.reported_ports(300)['port']}"
        llm.wait_until(
            lambda: httpx.get(f"{base_url}/health", timeout=2).status_code == 200, 300, "serving"
        )

        def ask(seed: int) -> int:
            body = {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": data_url(noise_image(200, 200, seed))},
                            }
                        ],
                    }
                ],
                "max_tokens": 2,
            }
            return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).status_code

        assert [ask(i) for i in range(12)] == [200] * 12
        addresses = ("127.0.0.1", "127.0.0.2")
        served = [_encode_count(a, p) for a, p in zip(addresses, metrics_ports, strict=True)]
        assert sum(served) == 12 and min(served) >= 3, served  # both replicas took requests

        replicas[0].stop()
        codes = []
        for i in range(12):
            codes.append(ask(100 + i))
            time.sleep(0.05)
        assert codes == [200] * 12, codes
        assert _encode_count(addresses[1], metrics_ports[1]) == served[1] + 12
    finally:
        if llm is not None:
            llm.stop()
        for replica in replicas:
            replica.stop()


def _encode_count(address: str, metrics_port: int) -> int:
    text = httpx.get(f"http://{address}:{metrics_port}/metrics", timeout=5).text
    match = re.search(r'^dvd:vision_requests_total\{status="OK"\} ([0-9.]+)$', text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


# ---- Dockerfile ---------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    text = (REPO_ROOT / "Dockerfile").read_text()
    return [
        line for line in text.replace("\\\n", " ").splitlines() if line and not line.startswith("#")
    ]


def test_dockerfile_stages():
    lines = _dockerfile()
    stages = [m.group(1) for line in lines if (m := re.match(r"FROM \S+ AS (\S+)", line))]
    assert {"sources", "cuda-base", "cuda-build", "cuda", "cpu-build", "cpu"} <= set(stages)
    for final in ("cuda", "cpu"):
        start = stages.index(final)
        block = _stage_lines(lines, final)
        assert any(line.startswith("USER dvd") for line in block), final  # non-root
        assert any(line.startswith("HEALTHCHECK") for line in block), final
        assert any("HF_HOME=/cache/huggingface" in line for line in block), final
        assert any(line.startswith('VOLUME ["/cache"]') for line in block), final
        # Final images copy only the built environment: no build stage leaks in.
        copies = [line for line in block if line.startswith("COPY")]
        assert copies == [f"COPY --from={final}-build /opt/venv /opt/venv"], (final, copies, start)
    build_lines = _stage_lines(lines, "cpu-build") + _stage_lines(lines, "cuda-build")
    assert all("--no-cache-dir" in line for line in build_lines if "pip install" in line)
    assert any(
        "pip uninstall -y torchvision torchaudio torchcodec" in line
        for line in _stage_lines(lines, "cpu-build")
    )
    assert not any(
        re.search(r"\.safetensors|snapshot_download|huggingface-cli", line) for line in lines
    )


def _stage_lines(lines: list[str], stage: str) -> list[str]:
    out: list[str] = []
    inside = False
    for line in lines:
        if line.startswith("FROM "):
            inside = line.endswith(f" AS {stage}")
            continue
        if inside:
            out.append(line)
    return out


def test_dockerfile_paths_and_commands_exist():
    import tomllib

    lines = _dockerfile()
    for line in lines:
        if line.startswith("COPY") and "--from=" not in line:
            *sources, _ = shlex.split(line)[1:]
            for source in sources:
                assert (REPO_ROOT / source).exists(), source
    # The sources stage holds every package the project installs (the services import
    # checkpoints/, the dvd-bench-vision command runs benchmarks/).
    copied = {
        Path(shlex.split(line)[-1]).name
        for line in _stage_lines(lines, "sources")
        if line.startswith("COPY")
    }
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {package.rstrip("*") for package in packages} <= copied, copied
    scripts = project["project"]["scripts"]
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for match in re.finditer(r'"/src\[(\w+)\]"', "\n".join(lines)):
        assert match.group(1) in extras
    commands = re.findall(r'(?:CMD|HEALTHCHECK .*CMD) \["([\w-]+)"', "\n".join(lines))
    assert commands and all(command in scripts for command in commands), commands
    for compose_file in (
        "docker-compose.yml",
        "docker-compose.cpu.yml",
        "docker-compose.single-gpu.yml",
    ):
        compose = load_compose(compose_file)
        for service in compose["services"].values():
            for key in ("command",):
                if key in service:
                    assert service[key][0] in scripts
            if "healthcheck" in service and "test" in service["healthcheck"]:
                assert service["healthcheck"]["test"][1] in scripts
            target = service.get("build", {}).get("target")
            if target and not target.startswith("$"):
                assert f" AS {target}" in "\n".join(lines)
