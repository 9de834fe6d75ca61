"""The Kubernetes manifests (deploy/kubernetes), proven without a cluster.

`kubectl kustomize` renders each variant; the objects are validated against the Kubernetes
API schemas; their wiring (ports, probes, Services, settings, GPUs, security) is checked
against the code and the image. Then the CPU variant's pods run as local processes, as a
kubelet would run them: each container's command line and environment from the rendered
objects, every pod on its own loopback address with the container ports mapped to free local
ports, volumes mapped to folders, probes polled as declared, and Service names resolved by a
small DNS server in the test that answers, like the cluster's DNS for a headless Service, with
the addresses of the ready vision pods. The language service resolves that name through
gRPC's own DNS resolver, so scaling the vision Deployment up and down is a real DNS change.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import grpc
import httpx
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import LLM_TEST_ENV, REPO_ROOT, ServerProcess, data_url, free_port, noise_image
from prometheus_client.metrics import MetricWrapperBase

from llm_server.settings import LLMSettings
from llm_server.vision.grpc_client import DNS_RERESOLUTION_INTERVAL_MS
from vision_server import metrics as vision_metrics
from vision_server.settings import VisionSettings

KUSTOMIZE = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu")
# Native gRPC probes are GA since 1.27; 1.29 is the oldest release still common in kind and
# managed clusters, 1.37 the newest schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.29", "1.37")
BIN = Path(sys.executable).parent
SETTINGS = {"dvd-vision-server": VisionSettings, "dvd-llm-server": LLMSettings}
# Variables the containers may set besides DvD's own settings.
OTHER_VARIABLES = {"HOME", "HF_HOME", "HF_TOKEN", "VLLM_NO_USAGE_STATS", "VLLM_CPU_KVCACHE_SPACE"}


# ---- rendering ------------------------------------------------------------------------------


@dataclass
class Manifests:
    objects: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        return found

    def generated(self, kind: str, name: str) -> dict[str, Any]:
        """A ConfigMap or Secret from a generator: its name carries a content hash."""
        (found,) = [
            o
            for o in self.all(kind)
            if re.fullmatch(rf"{name}-[a-z0-9]{{10}}", o["metadata"]["name"])
        ]
        return found

    def pod_spec(self, deployment: str) -> dict[str, Any]:
        return dict(self.get("Deployment", deployment)["spec"]["template"]["spec"])

    def container(self, deployment: str) -> dict[str, Any]:
        (container,) = self.pod_spec(deployment)["containers"]
        return dict(container)

    def environment(self, deployment: str) -> dict[str, str]:
        """The container's environment as the kubelet builds it from ConfigMaps and Secrets."""
        container = self.container(deployment)
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
                continue
            ref = variable["valueFrom"]
            if "secretKeyRef" in ref:
                secret = self.get("Secret", ref["secretKeyRef"]["name"])
                raw = secret.get("data", {})[ref["secretKeyRef"]["key"]]
                env[variable["name"]] = base64.b64decode(raw).decode()
            else:
                config = self.get("ConfigMap", ref["configMapKeyRef"]["name"])
                env[variable["name"]] = config["data"][ref["configMapKeyRef"]["key"]]
        return env


def kustomize(directory: Path) -> Manifests:
    assert shutil.which("kubectl"), "kubectl (with its built-in kustomize) is needed"
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Manifests([o for o in yaml.safe_load_all(result.stdout) if o])


@functools.cache
def rendered(overlay: str) -> Manifests:
    return kustomize(KUSTOMIZE / "overlays" / overlay)


def user_overlay(folder: Path, kustomization: dict[str, Any]) -> Manifests:
    """An operator's own overlay, in a folder outside the repository, on top of ours."""
    folder.mkdir(parents=True, exist_ok=True)

    def local(path: str) -> str:  # kustomize takes relative paths only
        return os.path.relpath(KUSTOMIZE / path, folder)

    document = dict(kustomization)
    for key in ("resources", "components"):
        if key in document:
            document[key] = [local(path) for path in document[key]]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(document))
    return kustomize(folder)


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as one of the container's ports."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    number = ports[port] if isinstance(port, str) else port
    assert number in ports.values(), f"port {port} is not a container port of {container['name']}"
    return int(number)


# ---- what each variant holds -------------------------------------------------------------


def test_every_variant_renders_the_same_objects():
    default = kustomize(KUSTOMIZE)  # deploy/kubernetes itself: the GPU variant
    assert default == rendered("gpu")
    for overlay in OVERLAYS:
        manifests = rendered(overlay)
        kinds = sorted((o["kind"], o["metadata"]["name"].split("-")[0]) for o in manifests.objects)
        assert kinds == [
            ("ConfigMap", "dvd"),
            ("ConfigMap", "dvd"),
            ("ConfigMap", "dvd"),
            ("Deployment", "llm"),
            ("Deployment", "vision"),
            ("Namespace", "dvd"),
            ("PersistentVolumeClaim", "model"),
            ("PodDisruptionBudget", "vision"),
            ("Secret", "dvd"),
            ("Service", "llm"),
            ("Service", "vision"),
        ], overlay
        for o in manifests.objects:
            if o["kind"] != "Namespace":
                assert o["metadata"]["namespace"] == "dvd", o["metadata"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_the_kubernetes_schemas(overlay, version):
    for o in rendered(overlay).objects:
        # strict: a misspelt or misplaced field is an error, not silently dropped.
        kubernetes_validate.validate(o, version, strict=True)


def test_a_broken_object_fails_the_schema_check():
    """The validation above can fail: a probe with a port given as text is refused."""
    vision = rendered("cpu").get("Deployment", "vision")
    broken = yaml.safe_load(yaml.safe_dump(vision))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(vision))
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vision_pods(overlay):
    manifests = rendered(overlay)
    container = manifests.container("vision")
    args = container["args"]
    assert container["command"] == ["dvd-vision-server"]
    assert flag(args, "host") == "0.0.0.0"
    grpc_port = container_port(container, "grpc")
    assert int(flag(args, "port")) == grpc_port
    metrics_port = container_port(container, "metrics")
    assert int(flag(args, "metrics-port")) == metrics_port
    # Native gRPC probes (grpc.health.v1) on the port the server listens on.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    annotations = manifests.get("Deployment", "vision")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"]["cpu"] and limits["memory"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert container["image"] == "dvd:cuda"
    else:
        assert "nvidia.com/gpu" not in limits
        assert container["image"] == "dvd:cpu"

    # Headless: DNS returns every ready pod, which dns:/// + round robin needs.
    service = manifests.get("Service", "vision")
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = manifests.get("Deployment", "vision")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (grpc_service_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert container_port(container, grpc_service_port["targetPort"]) == grpc_port
    budget = manifests.get("PodDisruptionBudget", "vision")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["maxUnavailable"] == 1

    # The language service's target is this Service's name and port.
    target = flag(manifests.container("llm")["args"], "vision-target")
    assert target == f"dns:///{service['metadata']['name']}:{grpc_service_port['port']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_language_pods(overlay):
    manifests = rendered(overlay)
    container = manifests.container("llm")
    args = container["args"]
    assert container["command"] == ["dvd-llm-server"]
    http_port = container_port(container, "http")
    assert int(flag(args, "port")) == http_port and flag(args, "host") == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container_port(container, container[probe]["httpGet"]["port"]) == http_port
    service = manifests.get("Service", "llm")
    assert container_port(container, service["spec"]["ports"][0]["targetPort"]) == http_port
    # vLLM's shared memory: a memory-backed emptyDir at /dev/shm.
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in manifests.pod_spec("llm")["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    tensor_parallel = int(manifests.environment("llm")["DVD_TENSOR_PARALLEL_SIZE"])
    limits = container["resources"]["limits"]
    if overlay == "gpu":
        assert int(limits["nvidia.com/gpu"]) == tensor_parallel == 1
    else:
        assert "nvidia.com/gpu" not in limits
        assert manifests.environment("llm")["DVD_ENFORCE_EAGER"] == "true"


def test_language_gpus_follow_the_tensor_parallel_size(tmp_path):
    """An operator's overlay that raises the size gets that many GPUs per language pod."""
    manifests = user_overlay(
        tmp_path / "tp4",
        {
            "resources": ["overlays/gpu"],
            "components": ["components/llm-gpus"],
            "configMapGenerator": [
                {
                    "name": "dvd-llm",
                    "behavior": "merge",
                    "literals": ["DVD_TENSOR_PARALLEL_SIZE=4"],
                }
            ],
        },
    )
    assert manifests.environment("llm")["DVD_TENSOR_PARALLEL_SIZE"] == "4"
    assert int(manifests.container("llm")["resources"]["limits"]["nvidia.com/gpu"]) == 4
    assert manifests.container("vision")["resources"]["limits"]["nvidia.com/gpu"] == 1
    for o in manifests.objects:
        kubernetes_validate.validate(o, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_operator_overlay_in_the_docs(tmp_path):
    """docs/deploy.md's example overlay renders: its model, GPUs, image, credentials."""
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL) if "Kustomization" in b]
    folder = tmp_path / "my-overlay"
    folder.mkdir()
    prefix = os.path.relpath(KUSTOMIZE, folder)
    (folder / "kustomization.yaml").write_text(block.replace("../dvd/deploy/kubernetes", prefix))
    (folder / "credentials.env").write_text("DVD_API_KEY=sk-local\nHF_TOKEN=hf_local\n")
    manifests = kustomize(folder)
    for o in manifests.objects:
        kubernetes_validate.validate(o, KUBERNETES_VERSIONS[-1], strict=True)
    llm = manifests.environment("llm")
    assert llm["DVD_MODEL"] == manifests.environment("vision")["DVD_MODEL"] != ""
    assert int(manifests.container("llm")["resources"]["limits"]["nvidia.com/gpu"]) == int(
        llm["DVD_TENSOR_PARALLEL_SIZE"]
    ) == 2  # fmt: skip
    assert llm["DVD_API_KEY"] == "sk-local" and llm["HF_TOKEN"] == "hf_local"
    assert manifests.container("vision")["image"].endswith("/dvd:cuda")
    assert "HorizontalPodAutoscaler" in {o["kind"] for o in manifests.objects}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_cache_config_and_credentials_are_shared(overlay):
    manifests = rendered(overlay)
    claim = manifests.get("PersistentVolumeClaim", "model-cache")
    secret = manifests.generated("Secret", "dvd-credentials")
    assert set(secret["data"]) == {"DVD_API_KEY", "HF_TOKEN"}
    for name in ("vision", "llm"):
        spec, container = manifests.pod_spec(name), manifests.container(name)
        (cache,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/cache"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == cache["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        env = manifests.environment(name)
        assert env["HF_HOME"].startswith("/cache/") and env["DVD_CACHE_DIR"].startswith("/cache/")
        assert "DVD_MODEL" in env and "HF_TOKEN" in env
        # Writable folders under the read-only root: HOME among them.
        writable = {m["mountPath"] for m in container["volumeMounts"]}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert env["HOME"] in writable and "/tmp" in writable
    # Only the language service holds the API key.
    assert "DVD_API_KEY" in manifests.environment("llm")
    assert "DVD_API_KEY" not in manifests.environment("vision")
    # One checkpoint for both: the same ConfigMap.
    refs = [
        {s["configMapRef"]["name"] for s in manifests.container(name)["envFrom"]}
        for name in ("vision", "llm")
    ]
    assert refs[0] & refs[1] == {manifests.generated("ConfigMap", "dvd-model")["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_names_are_settings(overlay):
    """Every DVD_* variable and flag a container gets is a field of that service's settings."""
    manifests = rendered(overlay)
    for name in ("vision", "llm"):
        container = manifests.container(name)
        fields = SETTINGS[container["command"][0]].model_fields
        for variable in manifests.environment(name):
            if variable.startswith("DVD_"):
                assert variable.removeprefix("DVD_").lower() in fields, (name, variable)
            else:
                assert variable in OTHER_VARIABLES, (name, variable)
        for arg in container["args"]:
            option = arg.removeprefix("--").split("=", 1)[0].replace("-", "_")
            assert option in fields, (name, arg)
    vision, llm = manifests.environment("vision"), manifests.environment("llm")
    # Calls on an aged connection may run as long as the language service waits for them.
    grace_s = int(vision["DVD_MAX_CONNECTION_AGE_GRACE_MS"]) / 1000
    assert grace_s >= float(llm["DVD_VISION_TIMEOUT_S"])
    # The pod's termination grace covers preStop and the language service's drain.
    spec = manifests.pod_spec("llm")
    pre_stop = int(manifests.container("llm")["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + float(llm["DVD_SHUTDOWN_GRACE_S"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay):
    manifests = rendered(overlay)
    namespace = manifests.get("Namespace", "dvd")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    (image_uid,) = set(re.findall(r"useradd .*--uid (\d+) dvd", dockerfile))
    allowed_volumes = {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
    for name in ("vision", "llm"):
        spec = manifests.pod_spec(name)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
        assert str(pod["runAsUser"]) == image_uid  # the image's own user owns its home
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= allowed_volumes, volume
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert not context.get("privileged") and "add" not in context["capabilities"]
            assert all("hostPort" not in p for p in container["ports"])


# ---- autoscaling -----------------------------------------------------------------------------


def _exported_series() -> set[str]:
    """Every series name the vision service exports (its collectors, not a list kept here)."""
    names = set()
    for collector in vars(vision_metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.collect():
                names |= {sample.name for sample in family.samples}
                names.add(family.name)
    return names


def test_autoscaling_component(tmp_path):
    manifests = user_overlay(
        tmp_path / "autoscaled",
        {"resources": ["overlays/gpu"], "components": ["components/autoscaling"]},
    )
    for o in manifests.objects:
        kubernetes_validate.validate(o, KUBERNETES_VERSIONS[-1], strict=True)
    autoscaler = manifests.get("HorizontalPodAutoscaler", "vision")
    assert autoscaler["metadata"]["namespace"] == "dvd"
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "vision")
    # The autoscaler owns the count: applying the manifests again must not reset it.
    assert "replicas" not in manifests.get("Deployment", "vision")["spec"]
    assert manifests.get("Deployment", "llm")["spec"]["replicas"] == 1
    wanted = {m["pods"]["metric"]["name"] for m in autoscaler["spec"]["metrics"]}
    assert all(m["type"] == "Pods" for m in autoscaler["spec"]["metrics"])  # never CPU

    # The Prometheus Adapter's rules serve exactly those names, from series that exist.
    values = yaml.safe_load(
        (KUSTOMIZE / "components" / "autoscaling" / "prometheus-adapter-values.yaml").read_text()
    )
    rules = values["rules"]["custom"]
    assert {rule["name"]["as"] for rule in rules} == wanted
    series = {rule["seriesQuery"].split("{")[0]: rule for rule in rules}
    assert "dvd:vision_queued_tiles" in series
    assert set(series) <= _exported_series(), set(series) - _exported_series()
    for name, rule in series.items():
        assert re.search(rule["name"]["matches"], name), rule


def test_keda_alternative_in_the_docs():
    """docs/deploy.md's KEDA ScaledObject scales the same Deployment on the same series."""
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL) if "ScaledObject" in b]
    (scaled,) = [yaml.safe_load(b) for b in blocks]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "vision"
    triggers = {t["metadata"]["query"]: t for t in scaled["spec"]["triggers"]}
    assert all(t["type"] == "prometheus" for t in triggers.values())
    queries = " ".join(triggers)
    assert "dvd:vision_queued_tiles" in queries
    hpa = yaml.safe_load((KUSTOMIZE / "components" / "autoscaling" / "vision-hpa.yaml").read_text())
    assert {t["metadata"]["threshold"] for t in triggers.values()} >= {
        hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    }
    named = set(re.findall(r"dvd:\w+", queries))
    assert named <= _exported_series(), named


# ---- the CPU variant as local processes ------------------------------------------------------


class ClusterDNS:
    """The cluster's DNS as far as a headless Service goes: a UDP server on 127.0.0.1 that
    answers A queries for a Service name with the addresses of its ready pods (NXDOMAIN when
    there are none), and nothing else."""

    def __init__(self) -> None:
        self._records: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)
        self._thread.start()

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self._records[f"{name}."] = list(addresses)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                query = dns.message.from_wire(wire)
                question = query.question[0]
            except (dns.exception.DNSException, IndexError):
                continue  # not a query
            reply = dns.message.make_response(query)
            with self._lock:
                addresses = self._records.get(question.name.to_text().lower())
            if not addresses:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                # TTL 1 s: the resolver's own cache must not hide a scale-up.
                reply.answer.append(dns.rrset.from_text(question.name, 1, "IN", "A", *addresses))
            self._socket.sendto(reply.to_wire(), client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


def grpc_probe(target: str, service: str, timeout: float) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class LocalPod:
    """One pod of a rendered Deployment run as a local process: the container's command line
    and environment, ``0.0.0.0`` replaced by the pod's own loopback address, container ports
    by the cluster's shared map of free local ports (every pod listens on the same ports, on
    its own address, as in a cluster), the model cache claim by a folder all pods share, other
    volumes by the pod's own folders, and ``dns:///`` targets pointed at the test's DNS."""

    manifests: Manifests
    deployment: str
    address: str
    ports: dict[int, int]
    dns: ClusterDNS
    root: Path
    log_dir: Path
    process: ServerProcess | None = None
    volumes: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = self.manifests.pod_spec(self.deployment)
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        for mount in self.container["volumeMounts"]:
            if mount["mountPath"] in ("/tmp", "/dev/shm"):
                continue  # the machine's own
            claim = claims.get(mount["name"])
            owner = f"claim-{claim}" if claim else f"{self.name}-{mount['name']}"
            self.volumes[mount["mountPath"]] = self.root / owner
            self.volumes[mount["mountPath"]].mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return f"{self.deployment}-{self.address}"

    @property
    def container(self) -> dict[str, Any]:
        return self.manifests.container(self.deployment)

    def translate(self, text: str) -> str:
        text = text.replace("0.0.0.0", self.address)
        for mount_path, folder in self.volumes.items():
            text = re.sub(rf"(?<![\w/]){re.escape(mount_path)}(?=/|$)", str(folder), text)
        text = re.sub(
            r"(?<=[:=])(\d{4,5})\b",
            lambda m: str(self.ports.get(int(m.group(1)), m.group(1))),
            text,
        )
        # gRPC's DNS resolver takes the DNS server as the target's authority.
        return re.sub(r"(?<![\w/])dns:///", f"dns://{self.dns.address}/", text)

    def start(self) -> None:
        container = self.container
        argv = [self.translate(a) for a in [*container["command"], *container["args"]]]
        env = {k: self.translate(v) for k, v in self.manifests.environment(self.deployment).items()}
        self.process = ServerProcess(
            self.name, [str(BIN / argv[0]), *argv[1:]], self.log_dir, env={**env, **LLM_TEST_ENV}
        )

    def local_port(self, port: int | str) -> int:
        return self.ports[container_port(self.container, port)]

    def probe(self, kind: str) -> bool:
        """One check of the container's probe ``kind``, as the kubelet makes it."""
        probe = self.container[kind]
        timeout = float(probe.get("timeoutSeconds", 1))
        if "grpc" in probe:
            target = f"{self.address}:{self.local_port(probe['grpc']['port'])}"
            return grpc_probe(target, probe["grpc"].get("service", ""), timeout)
        action = probe["httpGet"]
        url = f"http://{self.address}:{self.local_port(action['port'])}{action['path']}"
        return 200 <= httpx.get(url, timeout=timeout).status_code < 400

    def wait_ready(self) -> None:
        """The startup probe within its budget (period x failures), then readiness."""
        assert self.process is not None
        startup = self.container["startupProbe"]
        budget = startup.get("initialDelaySeconds", 0) + (
            startup["periodSeconds"] * startup["failureThreshold"]
        )
        self.process.wait_until(lambda: self.probe("startupProbe"), budget, "started")
        self.process.wait_until(lambda: self.probe("readinessProbe"), 30, "ready")

    def scrape(self) -> str:
        annotations = self.manifests.get("Deployment", self.deployment)["spec"]["template"][
            "metadata"
        ]["annotations"]
        port = self.ports[int(annotations["prometheus.io/port"])]
        url = f"http://{self.address}:{port}{annotations['prometheus.io/path']}"
        response = httpx.get(url, timeout=5)
        assert response.status_code == 200
        return response.text

    def encoded(self) -> int:
        """Encode calls this vision pod completed (its own counter)."""
        match = re.search(
            r'^dvd:vision_requests_total\{status="OK"\} ([0-9.]+)$', self.scrape(), re.MULTILINE
        )
        return int(float(match.group(1))) if match else 0


@dataclass
class LocalCluster:
    manifests: Manifests
    dns: ClusterDNS
    vision: list[LocalPod]
    llm: LocalPod
    make_pod: Callable[[str, str], LocalPod]

    def publish_vision(self) -> None:
        """The headless Service's DNS answer: every vision pod that is ready."""
        service = self.manifests.get("Service", "vision")["metadata"]["name"]
        self.dns.set(service, [pod.address for pod in self.vision])

    @property
    def base_url(self) -> str:
        service = self.manifests.get("Service", "llm")["spec"]["ports"][0]
        return f"http://{self.llm.address}:{self.llm.local_port(service['targetPort'])}"


# Connection age for the local run: short, so that the test waits seconds, not half a minute.
TEST_CONNECTION_AGE_MS = 3_000


@pytest.fixture(scope="module")
def cpu_cluster(tmp_path_factory, log_dir) -> Iterator[LocalCluster]:
    """The CPU variant, with an operator's overlay shortening the connection age, running as
    local processes: one vision pod and one language pod."""
    root = tmp_path_factory.mktemp("cluster")
    manifests = user_overlay(
        root / "overlay",
        {
            "resources": ["overlays/cpu"],
            "configMapGenerator": [
                {
                    "name": "dvd-vision",
                    "behavior": "merge",
                    "literals": [f"DVD_MAX_CONNECTION_AGE_MS={TEST_CONNECTION_AGE_MS}"],
                }
            ],
        },
    )
    declared = {
        p["containerPort"] for name in ("vision", "llm") for p in manifests.container(name)["ports"]
    }
    ports = {port: free_port() for port in declared}
    dns_server = ClusterDNS()
    started: list[LocalPod] = []

    def make_pod(deployment: str, address: str) -> LocalPod:
        pod = LocalPod(manifests, deployment, address, ports, dns_server, root, log_dir)
        started.append(pod)
        return pod

    try:
        vision, llm = make_pod("vision", "127.0.0.1"), make_pod("llm", "127.0.0.3")
        # Kubernetes starts both Deployments at once; the language service needs no vision
        # replica to start, and finds them through the Service once they are ready.
        vision.start()
        llm.start()
        cluster = LocalCluster(manifests, dns_server, [], llm, make_pod)
        vision.wait_ready()
        cluster.vision.append(vision)
        cluster.publish_vision()
        llm.wait_ready()
        yield cluster
    finally:
        for pod in reversed(started):
            if pod.process is not None:
                pod.process.stop()
        dns_server.close()


def chat_with_image(base_url: str, seed: int) -> httpx.Response:
    body = {
        "model": "dvd-tiny-internvl",
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": data_url(noise_image(200, 200, seed))},
                    },
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
        "max_tokens": 2,
    }
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


@pytest.mark.slow
def test_cpu_pods_serve_as_declared(cpu_cluster):
    cluster = cpu_cluster
    for pod in [*cluster.vision, cluster.llm]:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert pod.probe(kind), (pod.name, kind)
    # The series the autoscaler reads are on the page Prometheus is pointed at.
    page = cluster.vision[0].scrape()
    assert "dvd:vision_queued_tiles " in page and "dvd:vision_device_busy_seconds_total" in page
    assert "vllm:num_requests_running" in cluster.llm.scrape()
    reply = chat_with_image(cluster.base_url, seed=1)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    assert reply.json()["vision"]["vir"] == "auto"  # DVD_MODEL empty: the tiny Flash model
    assert cluster.vision[0].encoded() >= 1
    # The model cache claim holds the generated checkpoint, shared by both pods.
    (cache,) = {pod.volumes["/cache"] for pod in [*cluster.vision, cluster.llm]}
    assert any((cache / "dvd").iterdir())


class Traffic:
    """Chat requests with an image from two client threads, without pause, until stopped."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(2)
        self._workers = [self._pool.submit(self._run, worker) for worker in range(2)]

    def _run(self, worker: int) -> None:
        seed = 1000 * (worker + 1)
        while not self._stop.is_set():
            seed += 1
            try:
                self.statuses.append(chat_with_image(self.base_url, seed).status_code)
            except httpx.HTTPError:
                self.statuses.append(-1)

    def stop(self) -> list[int]:
        self._stop.set()
        for worker in self._workers:
            worker.result(timeout=150)
        self._pool.shutdown()
        return self.statuses


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"not within {timeout:.1f} s"
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.mark.slow
def test_new_vision_pods_get_calls_and_leaving_ones_drain(cpu_cluster):
    """Scale the vision Deployment from one pod to two: the new pod gets calls within the
    bound the connection age and the client's re-resolution interval give. Then take the
    first pod away as Kubernetes does (out of the Service's DNS answer, then SIGTERM): every
    call still succeeds, and the pod exits cleanly after draining."""
    cluster = cpu_cluster
    first = cluster.vision[0]
    age_s = int(cluster.manifests.environment("vision")["DVD_MAX_CONNECTION_AGE_MS"]) / 1000
    assert age_s == TEST_CONNECTION_AGE_MS / 1000
    # gRPC adds up to 10% of jitter to the age; then one re-resolution interval at most, and
    # a few seconds for a connection and a request on a busy 2-core machine.
    bound_s = 1.1 * age_s + DNS_RERESOLUTION_INTERVAL_MS / 1000 + 4

    traffic = Traffic(cluster.base_url)
    try:
        wait_for(lambda: first.encoded() >= 3, 60)

        second = cluster.make_pod("vision", "127.0.0.2")
        second.start()
        second.wait_ready()
        cluster.vision.append(second)
        cluster.publish_vision()
        took = wait_for(lambda: second.encoded() > 0, bound_s)
        print(f"new vision pod got its first call {took:.1f} s after it joined the Service")
        # Both keep taking calls (round robin over the two).
        before = (first.encoded(), second.encoded())
        wait_for(lambda: first.encoded() > before[0] + 2 and second.encoded() > before[1] + 2, 30)

        # Scale down: the pod leaves the DNS answer and gets SIGTERM (here without even the
        # preStop pause, which only makes the race with in-flight calls harder).
        cluster.vision.remove(first)
        cluster.publish_vision()
        assert first.process is not None
        assert first.process.stop(timeout=30) == 0, first.process.log_tail()
        after = second.encoded()
        wait_for(lambda: second.encoded() >= after + 4, 30)
    finally:
        statuses = traffic.stop()
    failed = [status for status in statuses if status != 200]
    assert len(statuses) >= 10 and not failed, f"{len(failed)} of {len(statuses)} failed: {failed}"
