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
import ipaddress
import math
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
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    LLM_TEST_ENV,
    REPO_ROOT,
    ServerProcess,
    data_url,
    free_port,
    noise_image,
    process_fixture,
)
from prometheus_client.metrics import MetricWrapperBase
from safetensors import safe_open

from checkpoints.spec import load_checkpoint_spec
from checkpoints.weights import safetensors_files
from llm_server.server import unauthenticated_exposure
from llm_server.settings import LLMSettings
from llm_server.vision.channels import DNS_RERESOLUTION_INTERVAL_MS
from vision_server import metrics as vision_metrics
from vision_server.invariance import chunk_tiles
from vision_server.settings import VisionSettings

KUSTOMIZE = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu")
# Native gRPC probes are GA since 1.27; 1.29 is the oldest release still common in kind and
# managed clusters, 1.37 the newest schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.29", "1.37")
BIN = Path(sys.executable).parent
SETTINGS = {"dvd-vision-server": VisionSettings, "dvd-llm-server": LLMSettings}
# Variables the containers may set besides DvD's own settings.
OTHER_VARIABLES = {
    "HOME",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
    "VLLM_NO_USAGE_STATS",
}


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

    def pod_labels(self, deployment: str) -> dict[str, str]:
        return dict(self.get("Deployment", deployment)["spec"]["template"]["metadata"]["labels"])

    def container(self, deployment: str, name: str | None = None) -> dict[str, Any]:
        """The pod's one container, or its init container ``name``."""
        if name is None:
            (container,) = self.pod_spec(deployment)["containers"]
        else:
            (container,) = [
                c for c in self.pod_spec(deployment).get("initContainers", []) if c["name"] == name
            ]
        return dict(container)

    def has(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.all(kind))

    def environment(self, deployment: str, container: str | None = None) -> dict[str, str]:
        """The container's environment as the kubelet builds it from ConfigMaps and Secrets.
        A Secret the manifests do not hold is one the operator creates (``secret_refs``): its
        variables are left out here."""
        spec = self.container(deployment, container)
        env: dict[str, str] = {}
        for source in spec.get("envFrom", []):
            env.update(self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        for variable in spec.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
                continue
            ref = variable["valueFrom"]
            if "secretKeyRef" in ref:
                if not self.has("Secret", ref["secretKeyRef"]["name"]):
                    continue
                secret = self.get("Secret", ref["secretKeyRef"]["name"])
                raw = secret.get("data", {})[ref["secretKeyRef"]["key"]]
                env[variable["name"]] = base64.b64decode(raw).decode()
            else:
                config = self.get("ConfigMap", ref["configMapKeyRef"]["name"])
                env[variable["name"]] = config["data"][ref["configMapKeyRef"]["key"]]
        return env

    def secret_refs(self, deployment: str) -> dict[str, dict[str, Any]]:
        """The container's variables read from Secrets: variable -> its secretKeyRef."""
        return {
            variable["name"]: variable["valueFrom"]["secretKeyRef"]
            for variable in self.container(deployment).get("env", [])
            if "secretKeyRef" in variable.get("valueFrom", {})
        }


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
            ("NetworkPolicy", "default"),
            ("NetworkPolicy", "llm"),
            ("NetworkPolicy", "llm"),
            ("NetworkPolicy", "vision"),
            ("NetworkPolicy", "vision"),
            ("PersistentVolumeClaim", "model"),
            ("PodDisruptionBudget", "vision"),
            ("Secret", "dvd"),  # dvd-credentials; the API key's Secret is the operator's
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

    # Headless: DNS returns every ready pod, so the language service sees each as a replica.
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


def render_doc_overlay(tmp_path: Path, naming: str) -> Manifests:
    """The one operator overlay in docs/deploy.md that mentions ``naming``, rendered as if
    it sat next to a clone of this repository, with the files it reads."""
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    (block,) = [
        b
        for b in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL)
        if "kind: Kustomization" in b and naming in b
    ]
    folder = tmp_path / "my-overlay"
    folder.mkdir()
    prefix = os.path.relpath(KUSTOMIZE, folder)
    (folder / "kustomization.yaml").write_text(block.replace("../dvd/deploy/kubernetes", prefix))
    (folder / "api-key.env").write_text("DVD_API_KEY=sk-local\n")
    (folder / "credentials.env").write_text("HF_TOKEN=hf_local\n")
    manifests = kustomize(folder)
    for o in manifests.objects:
        kubernetes_validate.validate(o, KUBERNETES_VERSIONS[-1], strict=True)
    return manifests


def test_the_operator_overlay_in_the_docs(tmp_path):
    """docs/deploy.md's example overlay renders: its model, GPUs, image, credentials, and the
    egress its model download needs."""
    manifests = render_doc_overlay(tmp_path, "configMapGenerator")
    llm = manifests.environment("llm")
    assert llm["DVD_MODEL"] == manifests.environment("vision")["DVD_MODEL"] != ""
    assert int(manifests.container("llm")["resources"]["limits"]["nvidia.com/gpu"]) == int(
        llm["DVD_TENSOR_PARALLEL_SIZE"]
    ) == 2  # fmt: skip
    # The API key's Secret, generated by the overlay, is the one the pods read.
    assert llm["DVD_API_KEY"] == "sk-local" and llm["HF_TOKEN"] == "hf_local"
    assert unauthenticated_exposure(declared_settings(manifests, "llm")) is None
    assert manifests.container("vision")["image"].endswith("/dvd:cuda")
    assert "HorizontalPodAutoscaler" in {o["kind"] for o in manifests.objects}
    # A hub checkpoint: the language pods download it.
    c = Cluster.of(manifests)
    assert c.allows(c.llm, c.internet, 443) and not c.allows(c.vision, c.internet, 443)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_cache_config_and_credentials_are_shared(overlay):
    manifests = rendered(overlay)
    claim = manifests.get("PersistentVolumeClaim", "model-cache")
    secret = manifests.generated("Secret", "dvd-credentials")
    assert set(secret["data"]) == {"HF_TOKEN"}
    for name in ("vision", "llm"):
        spec, container = manifests.pod_spec(name), manifests.container(name)
        (cache,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/cache"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == cache["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        env = manifests.environment(name)
        assert env["HF_HOME"].startswith("/cache/") and env["DVD_CACHE_DIR"].startswith("/cache/")
        assert "DVD_MODEL" in env
        # Writable folders under the read-only root: HOME among them.
        writable = {m["mountPath"] for m in container["volumeMounts"]}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert env["HOME"] in writable and "/tmp" in writable
    # One checkpoint for both: the same ConfigMap.
    refs = [
        {s["configMapRef"]["name"] for s in manifests.container(name)["envFrom"]}
        for name in ("vision", "llm")
    ]
    assert refs[0] & refs[1] == {manifests.generated("ConfigMap", "dvd-model")["metadata"]["name"]}


def cache_mount(container: dict[str, Any]) -> dict[str, Any]:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/cache"]
    return dict(mount)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_language_pods_write_the_model_cache(overlay):
    """The language pods download the checkpoint (or generate the tiny model) and write their
    config views; the vision pods, whose egress is DNS only, read the cache: read-only, hub
    offline, no hub token. Their init container waits for the checkpoint, read-only too."""
    manifests = rendered(overlay)
    llm = manifests.container("llm")
    assert not cache_mount(llm).get("readOnly")
    assert "HF_TOKEN" in manifests.secret_refs("llm")
    assert "HF_HUB_OFFLINE" not in manifests.environment("llm")
    (init,) = manifests.pod_spec("vision")["initContainers"]
    for container, env in [
        (manifests.container("vision"), manifests.environment("vision")),
        (init, manifests.environment("vision", init["name"])),
    ]:
        assert cache_mount(container)["readOnly"] is True, container["name"]
        assert env["HF_HUB_OFFLINE"] == "1", container["name"]
        assert not {"HF_TOKEN", "DVD_API_KEY"} & set(env), container["name"]
    assert not manifests.secret_refs("vision")
    # The wait reads the checkpoint the way the server does: the same settings.
    assert init["image"] == manifests.container("vision")["image"]
    assert {s["configMapRef"]["name"] for s in init["envFrom"]} <= {
        s["configMapRef"]["name"] for s in manifests.container("vision")["envFrom"]
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_names_are_settings(overlay):
    """Every DVD_* variable and flag a container gets is a field of that service's settings."""
    manifests = rendered(overlay)
    for name in ("vision", "llm"):
        container = manifests.container(name)
        fields = SETTINGS[container["command"][0]].model_fields
        # The init container reads the same settings as the server (VisionSettings).
        inits = [c["name"] for c in manifests.pod_spec(name).get("initContainers", [])]
        for variable in set().union(
            *(manifests.environment(name, c) for c in [None, *inits]),
            manifests.secret_refs(name),
        ):
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
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert not context.get("privileged") and "add" not in context["capabilities"]
            assert all("hostPort" not in p for p in container.get("ports", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_gets_a_service_account_token(overlay):
    """Neither service calls the Kubernetes API: a token in the pod would only be something
    to steal."""
    manifests = rendered(overlay)
    pods = [o["spec"]["template"]["spec"] for o in manifests.all("Deployment")]
    assert len(pods) == 2
    for spec in pods:
        assert spec["automountServiceAccountToken"] is False


# ---- the API key -----------------------------------------------------------------------------


def declared_settings(manifests: Manifests, deployment: str, **overrides: Any) -> Any:
    """The container's settings as its process reads them: its DVD_* variables (empty ones
    mean unset, as the services read them), then its flags, which win."""
    container = manifests.container(deployment)
    values: dict[str, Any] = {
        variable.removeprefix("DVD_").lower(): value
        for variable, value in manifests.environment(deployment).items()
        if variable.startswith("DVD_") and value != ""
    }
    for arg in container["args"]:
        name, equals, value = arg.removeprefix("--").partition("=")
        assert equals, f"{arg}: the manifests give every flag a value"
        values[name.replace("-", "_")] = value
    values.update(overrides)
    # model_validate, not the constructor: this process's own DVD_* variables must not count.
    return SETTINGS[container["command"][0]].model_validate(values)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_key_is_required(overlay):
    """The language pods read DVD_API_KEY from a Secret the operator creates (not optional:
    the kubelet does not start the container without it), nothing opts out of the key, and
    the server refuses 0.0.0.0 without one, so an empty Secret is refused too."""
    manifests = rendered(overlay)
    ref = manifests.secret_refs("llm")["DVD_API_KEY"]
    assert ref["name"] == "dvd-api-key" and not ref.get("optional", False)
    assert not manifests.has("Secret", "dvd-api-key")
    assert not any(
        arg.startswith("--allow-unauthenticated") for arg in manifests.container("llm")["args"]
    )
    assert "DVD_ALLOW_UNAUTHENTICATED" not in manifests.environment("llm")
    settings = declared_settings(manifests, "llm")
    assert settings.host == "0.0.0.0" and settings.api_key is None
    assert unauthenticated_exposure(settings) is not None
    assert unauthenticated_exposure(declared_settings(manifests, "llm", api_key="")) is not None
    assert unauthenticated_exposure(declared_settings(manifests, "llm", api_key="sk-1")) is None


@pytest.mark.processes
def test_the_language_container_refuses_to_start_without_a_key(tmp_path, log_dir):
    """The CPU variant's language container as declared, with the empty key an empty Secret
    gives: it exits with status 2 and the reason within seconds, on 0.0.0.0 as in its pod,
    before binding its port or touching the model cache (nothing downloaded or generated)."""
    manifests = rendered("cpu")
    container = manifests.container("llm")
    cache, home = tmp_path / "cache", tmp_path / "home"
    cache.mkdir()
    home.mkdir()
    http_port = container_port(container, "http")
    argv = [  # port 0: should it bind after all, it takes a free port rather than the pod's
        "--port=0" if arg == f"--port={http_port}" else arg
        for arg in [*container["command"], *container["args"]]
    ]
    assert "--host=0.0.0.0" in argv and "--port=0" in argv
    env = {
        name: re.sub(r"^/cache(?=/|$)", str(cache), value)
        for name, value in manifests.environment("llm").items()
    }
    env |= {"DVD_API_KEY": "", "HOME": str(home)}
    process = ServerProcess(
        "llm-without-key", [str(BIN / argv[0]), *argv[1:]], log_dir, env={**env, **LLM_TEST_ENV}
    )
    try:
        status = process.proc.wait(timeout=30)  # it exits in about 2 s
    finally:
        process.stop()
    assert status == 2, process.log_tail()
    assert "refusing to serve /v1 on 0.0.0.0 without an API key" in process.log_tail()
    assert not any(cache.iterdir())


# ---- network policies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (namespace, labels, named container ports) or, with no
    namespace, an address outside the cluster."""

    ip: str
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator reads matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _namespace_labels(name: str) -> dict[str, str]:
    # The API server labels every namespace with its own name.
    return {"kubernetes.io/metadata.name": name}


def _peer_matches(peer: dict[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        inside = [ipaddress.ip_network(block["cidr"])]
        excluded = [ipaddress.ip_network(c) for c in block.get("except", [])]
        return any(address in n for n in inside if n.version == address.version) and not any(
            address in n for n in excluded if n.version == address.version
        )
    if other.namespace is None:
        return False  # pod and namespace selectors select pods only
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], _namespace_labels(other.namespace)):
            return False
    elif other.namespace != policy_namespace:
        return False
    return _selects(peer.get("podSelector", {}), other.labels)


def _port_matches(rule_port: dict[str, Any], target: Endpoint, port: int, protocol: str) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    if "port" not in rule_port:
        return True
    wanted = rule_port["port"]
    # A named port is the destination pod's container port of that name.
    return (target.ports.get(wanted) if isinstance(wanted, str) else wanted) == port


def _direction_allows(
    policies: list[dict[str, Any]],
    direction: str,
    pod: Endpoint,
    other: Endpoint,
    target: Endpoint,
    port: int,
    protocol: str,
) -> bool:
    """NetworkPolicy's rule for one side: a pod no policy selects for ``direction`` is open;
    a selected one allows what any rule of any selecting policy allows."""
    kind, peers_key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and kind in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True
    return any(
        (
            not rule.get("ports")
            or any(_port_matches(r, target, port, protocol) for r in rule["ports"])
        )
        and (
            not rule.get(peers_key)
            or any(
                _peer_matches(peer, p["metadata"]["namespace"], other) for peer in rule[peers_key]
            )
        )
        for p in selecting
        for rule in p["spec"].get(direction, [])
    )


def connection_allowed(
    manifests: Manifests, source: Endpoint, target: Endpoint, port: int, protocol: str = "TCP"
) -> bool:
    """Whether the policies let ``source`` open a connection to ``target``'s ``port``: the
    source's egress rules (for a pod) and the target's ingress rules (for a pod)."""
    policies = manifests.all("NetworkPolicy")
    egress = source.namespace is None or _direction_allows(
        policies, "egress", source, target, target, port, protocol
    )
    ingress = target.namespace is None or _direction_allows(
        policies, "ingress", target, source, target, port, protocol
    )
    return egress and ingress


def pod_of(manifests: Manifests, deployment: str, ip: str) -> Endpoint:
    ports = {p["name"]: p["containerPort"] for p in manifests.container(deployment)["ports"]}
    namespace = manifests.get("Deployment", deployment)["metadata"]["namespace"]
    return Endpoint(ip, namespace, manifests.pod_labels(deployment), ports)


@dataclass
class Cluster:
    """The pods and addresses the policy tests connect, for one rendering."""

    manifests: Manifests
    vision: Endpoint
    llm: Endpoint
    neighbour: Endpoint = Endpoint("10.244.3.3", "dvd", {"app": "debug"})
    prometheus: Endpoint = Endpoint("10.244.4.4", "monitoring", {"app": "prometheus"})
    elsewhere: Endpoint = Endpoint("10.244.5.5", "default", {"app": "web"})
    dns: Endpoint = Endpoint("10.244.0.10", "kube-system", {"k8s-app": "kube-dns"})
    internet: Endpoint = Endpoint("34.120.54.55")  # a public address: the hub, an image host
    private: Endpoint = Endpoint("10.0.12.7")  # something on the cluster's private network
    metadata: Endpoint = Endpoint("169.254.169.254")  # a cloud's instance metadata
    shared: Endpoint = Endpoint("100.100.100.200")  # shared range: some clouds' metadata
    client: Endpoint = Endpoint("203.0.113.9")  # an API client outside the cluster

    @classmethod
    def of(cls, manifests: Manifests) -> Cluster:
        return cls(
            manifests,
            pod_of(manifests, "vision", "10.244.1.1"),
            pod_of(manifests, "llm", "10.244.2.2"),
        )

    def allows(self, source: Endpoint, target: Endpoint, port: int, protocol: str = "TCP") -> bool:
        return connection_allowed(self.manifests, source, target, port, protocol)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay):
    """What each component may reach and be reached by, evaluated on the rendered policies."""
    manifests = rendered(overlay)
    c = Cluster.of(manifests)
    grpc_port, metrics_port = c.vision.ports["grpc"], c.vision.ports["metrics"]
    http_port = c.llm.ports["http"]
    # Every component has its own policies, for both directions.
    for pod in (c.vision, c.llm):
        own = [
            p
            for p in manifests.all("NetworkPolicy")
            if p["spec"]["podSelector"].get("matchLabels")
            and _selects(p["spec"]["podSelector"], pod.labels)
        ]
        assert {t for p in own for t in p["spec"]["policyTypes"]} == {"Ingress", "Egress"}

    # The vision gRPC port (no authentication of its own): language pods only.
    assert c.allows(c.llm, c.vision, grpc_port)
    for stranger in (c.neighbour, c.prometheus, c.elsewhere, c.client):
        assert not c.allows(stranger, c.vision, grpc_port), stranger
    # Metrics: the monitoring namespace only (the language pods' /metrics shares the API port).
    assert c.allows(c.prometheus, c.vision, metrics_port)
    assert c.allows(c.prometheus, c.llm, http_port)
    for stranger in (c.neighbour, c.elsewhere, c.llm, c.client):
        assert not c.allows(stranger, c.vision, metrics_port), stranger
    # The API: from anywhere by default (it needs the key); a pod of this namespace that no
    # rule names cannot call out at all.
    for caller in (c.client, c.elsewhere):
        assert c.allows(caller, c.llm, http_port), caller
    assert not c.allows(c.neighbour, c.llm, http_port)
    assert not c.allows(c.client, c.llm, 9999)

    # DNS from both; the vision pods reach nothing else.
    for pod in (c.vision, c.llm):
        assert c.allows(pod, c.dns, 53, "UDP") and c.allows(pod, c.dns, 53, "TCP")
        assert not c.allows(pod, c.dns, 443)
    for target, port in [
        (c.llm, http_port),
        (c.internet, 443),
        (c.private, 443),
        (c.metadata, 80),
        (c.prometheus, 9090),
    ]:
        assert not c.allows(c.vision, target, port), target
    # The language pods: the vision gRPC port and DNS, nothing else by default (no hub).
    assert not c.allows(c.llm, c.vision, metrics_port)
    for target in (c.internet, c.private, c.metadata, c.shared):
        assert not c.allows(c.llm, target, 443), target
    # Anything else in the namespace starts closed, both ways.
    assert not c.allows(c.neighbour, c.dns, 53, "UDP")
    assert not c.allows(c.neighbour, c.internet, 443)
    assert not c.allows(c.client, c.neighbour, 8080)


def test_internet_egress_component(tmp_path):
    """With components/internet-egress the language pods reach public HTTPS addresses (the
    hub, allow-listed image hosts); private and metadata addresses stay closed, and the vision
    pods still reach nothing."""
    manifests = user_overlay(
        tmp_path / "online",
        {"resources": ["overlays/gpu"], "components": ["components/internet-egress"]},
    )
    for o in manifests.objects:
        kubernetes_validate.validate(o, KUBERNETES_VERSIONS[-1], strict=True)
    c = Cluster.of(manifests)
    assert manifests.get("NetworkPolicy", "llm-internet")["metadata"]["namespace"] == "dvd"
    assert c.allows(c.llm, c.internet, 443)
    assert c.allows(c.llm, Endpoint("2606:4700::6810:84e5"), 443)
    for target in (c.private, c.metadata, c.shared, Endpoint("fd00::1"), Endpoint("127.0.0.1")):
        assert not c.allows(c.llm, target, 443), target
    assert not c.allows(c.llm, c.internet, 80)
    assert not c.allows(c.vision, c.internet, 443)


def test_network_policy_changes_in_the_docs(tmp_path):
    """docs/deploy.md's overlay that moves metrics to another namespace and admits the API
    from the ingress controller only: both metrics policies follow, and the API closes to
    everyone else."""
    manifests = render_doc_overlay(tmp_path, "kind: NetworkPolicy")
    c = Cluster.of(manifests)
    observability = Endpoint("10.244.6.6", "observability", {"app": "prometheus"})
    ingress = Endpoint("10.244.7.7", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    http_port, metrics_port = c.llm.ports["http"], c.vision.ports["metrics"]
    assert c.allows(observability, c.vision, metrics_port)
    assert c.allows(observability, c.llm, http_port)
    assert not c.allows(c.prometheus, c.vision, metrics_port)
    assert c.allows(ingress, c.llm, http_port)
    for caller in (c.client, c.elsewhere, c.neighbour, c.prometheus):
        assert not c.allows(caller, c.llm, http_port), caller
    assert c.allows(c.llm, c.vision, c.vision.ports["grpc"])


# ---- memory limits ---------------------------------------------------------------------------
#
# Past its memory limit a container is killed, and every request in flight fails with it;
# within it, the services' own limits refuse the request that would go too far (413, 429) and
# serve the rest. So each overlay's limit must hold the most its settings let the container
# use: a sum of terms, each the most one part of the service can hold, which docs/deploy.md
# ("Memory limits") states as the same formula. Host memory only: on a GPU the weights,
# activations and KV cache live in device memory, which vLLM and the vision service size.

MiB, GiB = 1 << 20, 1 << 30
TILE_SIDE = 448  # InternVL3.5's tile
TILE_BYTES = 3 * TILE_SIDE**2  # one tile as uint8 RGB pixels
# Interpreter, torch, Pillow, PyAV, gRPC, thread stacks and allocator slack. Measured idle on
# the CPU with the tiny model (docs/security.md, "Soak"): vision 0.74 to 0.96 GiB, language
# 1.3 GiB (API and engine-core processes). On CUDA the context and its libraries add host
# memory: an estimate, per process that uses a GPU, not measured yet.
RUNTIME_BYTES = {"vision": 3 * GiB // 2, "llm": 2 * GiB}
CUDA_PROCESS_BYTES = 4 * GiB
# Host bytes per pixel while one image is decoded, converted and transposed, measured peaks:
# WebP 16.4, PNG RGBA and CMYK TIFF 12.1, progressive JPEG 9.9, GIF 9.1; 20 with a margin.
IMAGE_BYTES_PER_PIXEL = 20
# Host bytes per frame pixel while one video is decoded: up to 16 reference frames and the
# frames being decoded at up to 3 bytes a pixel (10-bit 4:2:0 keeps 16-bit samples), and the
# RGB copy; measured 24 to 36 for 8-bit H.264; 64 with a margin.
VIDEO_BYTES_PER_PIXEL = 64


@dataclass(frozen=True)
class ServedModel:
    """What the bound needs of the checkpoint a deployment serves."""

    parameters: int  # the whole checkpoint: an overcount for either half
    file_bytes: int
    vit_tokens: int  # tokens per tile inside the ViT: (448 / patch)^2 + class token
    vit_hidden: int
    vit_heads: int
    vit_intermediate: int
    tokens_per_tile: int  # rows per tile sent to the language model
    llm_hidden: int

    @classmethod
    def read(cls, path: Path) -> ServedModel:
        spec = load_checkpoint_spec(path)
        parameters = 0
        for file in safetensors_files(path):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    parameters += math.prod(handle.get_slice(name).get_shape())
        vision = spec.vision
        return cls(
            parameters=parameters,
            file_bytes=sum(f.stat().st_size for f in safetensors_files(path)),
            vit_tokens=(vision.image_size // vision.patch_size) ** 2 + 1,
            vit_hidden=vision.hidden_size,
            vit_heads=vision.num_heads,
            vit_intermediate=vision.intermediate_size,
            tokens_per_tile=spec.tokens_per_tile,
            llm_hidden=spec.llm_hidden_size,
        )


def row_bytes(vision: VisionSettings, device: str) -> int:
    """One tile's rows as they travel: the vision service's dtype (auto: bfloat16 on CUDA)."""
    dtype = vision.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return 4 if dtype == "float32" else 2


def media_per_request(llm: LLMSettings) -> int:
    """Encoded image and video bytes one chat request can carry: its caps, and without
    allow-listed hosts (data: URLs only) three quarters of the body (base64)."""
    media = (
        llm.max_images_per_request * llm.max_image_bytes
        + llm.max_videos_per_request * llm.max_video_bytes
    )
    return media if llm.allowed_image_hosts else min(media, llm.max_request_bytes * 3 // 4)


def vision_memory(
    vision: VisionSettings, llm: LLMSettings, llm_replicas: int, device: str, model: ServedModel
) -> dict[str, int]:
    """The most one vision pod holds, term by term."""
    # Encode calls in flight at one pod: each chat request makes at most one at a time.
    calls = llm_replicas * llm.max_concurrent_requests
    chunk = chunk_tiles(vision.batch_invariant, torch.device(device)) or vision.max_batch_tiles
    tokens = model.vit_tokens
    per_tile_activations = (
        4  # float32
        * tokens
        * (2 * model.vit_heads * tokens + 6 * model.vit_hidden + 2 * model.vit_intermediate)
    )
    image = (
        IMAGE_BYTES_PER_PIXEL * vision.max_image_pixels
        # The resized image (4 bytes a pixel) and its tiles.
        + (vision.max_tiles_limit + 1) * (4 * TILE_SIDE**2 + TILE_BYTES)
    )
    video = VIDEO_BYTES_PER_PIXEL * vision.max_video_pixels + vision.max_num_frames * TILE_BYTES
    decode = max(image, video)
    tile_rows = model.tokens_per_tile * model.llm_hidden * row_bytes(vision, device)
    # Where decoding runs in worker processes with a cap on their address space, the cap
    # bounds each worker, whatever it decodes.
    worker_cap_mb = getattr(vision, "media_worker_memory_mb", None)
    if worker_cap_mb is not None:
        decode = worker_cap_mb * MiB
    # Unset, the count follows the node's CPUs, which a pod's limits do not change.
    assert vision.preprocess_workers is not None, "set DVD_PREPROCESS_WORKERS"
    return {
        "runtime": RUNTIME_BYTES["vision"] + (CUDA_PROCESS_BYTES if device == "cuda" else 0),
        # Read from the file, then converted (float32 at most): both at once while loading.
        "weights": 2 * 4 * model.parameters,
        "queued tiles": min(vision.max_queued_bytes, vision.max_queued_tiles * TILE_BYTES),
        # Tiles taken off the queue into passes, as uint8 and normalised to float32.
        "tiles in passes": vision.passes_in_flight * vision.max_batch_tiles * 5 * TILE_BYTES,
        # One layer's activations of the tiles computed at once: attention scores and their
        # softmax, the token-wide tensors and the MLP's. On CUDA: device memory.
        "activations": 0 if device == "cuda" else chunk * per_tile_activations,
        # Rows of a call are kept until all its tiles are encoded (routing is per call).
        "rows": calls * vision.max_tiles_per_request * tile_rows,
        "embedding cache": vision.embedding_cache_mb * MiB,
        "decoding": vision.preprocess_workers * decode,
        # The received message and the payloads taken from it.
        "calls": calls * 2 * min(vision.max_message_bytes, media_per_request(llm)),
    }


def llm_memory(
    llm: LLMSettings,
    vision: VisionSettings,
    device: str,
    model: ServedModel,
    memory_volumes: int,
    kv_cache_gib: float,
) -> dict[str, int]:
    """The most one language pod holds, term by term."""
    gpus = llm.tensor_parallel_size * llm.pipeline_parallel_size
    requests = llm.max_concurrent_requests
    tile_rows = model.tokens_per_tile * model.llm_hidden * row_bytes(vision, device)
    return {
        "runtime": RUNTIME_BYTES["llm"] + (gpus * CUDA_PROCESS_BYTES if device == "cuda" else 0),
        # CPU: read, then held (float32 at most). CUDA: the files pass through host memory.
        "weights": 2 * 4 * model.parameters if device == "cpu" else model.file_bytes,
        "KV cache": int(kv_cache_gib * GiB) if device == "cpu" else 0,
        # Memory-backed emptyDirs (/dev/shm) are charged to the pod.
        "memory volumes": memory_volumes,
        # Each connection may be reading a body; a body is held as read, joined, and parsed
        # (data URLs decoded).
        "request bodies": llm.connection_limit * 3 * llm.max_request_bytes,
        "fetched media": requests * media_per_request(llm) if llm.allowed_image_hosts else 0,
        # A request's rows from the vision service, and vLLM's copy in its engine process.
        "rows": requests * vision.max_tiles_per_request * tile_rows * 2,
    }


_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")


def quantity_bytes(text: str | int) -> int:
    """A Kubernetes memory quantity (``4Gi``, ``512Mi``, ``1G``, bytes) in bytes."""
    match = _QUANTITY.match(str(text))
    assert match, f"unsupported quantity {text!r}"
    scale = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return int(match.group(1)) * scale[match.group(2)]


def memory_volume_bytes(manifests: Manifests, deployment: str) -> int:
    """The size limits of the memory-backed volumes the container mounts."""
    mounted = {m["name"] for m in manifests.container(deployment)["volumeMounts"]}
    total = 0
    for volume in manifests.pod_spec(deployment)["volumes"]:
        if volume["name"] in mounted and volume.get("emptyDir", {}).get("medium") == "Memory":
            assert "sizeLimit" in volume["emptyDir"], f"{volume['name']}: unbounded tmpfs"
            total += quantity_bytes(volume["emptyDir"]["sizeLimit"])
    return total


def memory_bounds(manifests: Manifests, model: ServedModel) -> dict[str, dict[str, int]]:
    vision = declared_settings(manifests, "vision")
    llm = declared_settings(manifests, "llm")
    gpu = "nvidia.com/gpu" in manifests.container("vision")["resources"]["limits"]
    device = "cuda" if gpu else "cpu"
    replicas = manifests.get("Deployment", "llm")["spec"]["replicas"]
    return {
        "vision": vision_memory(vision, llm, replicas, device, model),
        "llm": llm_memory(
            llm,
            vision,
            device,
            model,
            memory_volume_bytes(manifests, "llm"),
            llm.cpu_kv_cache_gib,
        ),
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_limits_hold_what_the_settings_allow(overlay, tiny_flash_models):
    manifests = rendered(overlay)
    assert not manifests.environment("vision")["DVD_MODEL"], "count that checkpoint's size"
    model = ServedModel.read(tiny_flash_models["hf"])  # DVD_MODEL empty: the tiny model
    for name, terms in memory_bounds(manifests, model).items():
        limit = quantity_bytes(manifests.container(name)["resources"]["limits"]["memory"])
        bound = sum(terms.values())
        table = "\n".join(f"  {term:<16} {size / GiB:6.2f} GiB" for term, size in terms.items())
        summary = f"{overlay} {name}: bound {bound / GiB:.2f} GiB, limit {limit / GiB:.2f} GiB"
        print(f"{summary}\n{table}")
        assert bound <= limit, f"{summary}\n{table}"
        # Requests reserve what the pod needs idle at least.
        request = quantity_bytes(manifests.container(name)["resources"]["requests"]["memory"])
        assert terms["runtime"] <= request <= limit


def test_the_memory_bound_catches_settings_that_outgrow_the_limit(tmp_path, tiny_flash_models):
    """The CPU overlay's vision limit does not hold what the services' defaults allow (the
    reason the overlay sets its own), and an overlay that raises a setting fails the check."""
    model = ServedModel.read(tiny_flash_models["hf"])
    limit = quantity_bytes(rendered("cpu").container("vision")["resources"]["limits"]["memory"])
    defaults = vision_memory(
        VisionSettings.model_validate({"preprocess_workers": 4}),
        LLMSettings.model_validate({}),
        1,
        "cpu",
        model,
    )
    assert sum(defaults.values()) > limit
    raised = user_overlay(
        tmp_path / "bigger-cache",
        {
            "resources": ["overlays/cpu"],
            "configMapGenerator": [
                {
                    "name": "dvd-vision",
                    "behavior": "merge",
                    "literals": ["DVD_EMBEDDING_CACHE_MB=8192"],
                }
            ],
        },
    )
    assert sum(memory_bounds(raised, model)["vision"].values()) > limit


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


# Read-only volume mounts, for local processes (tests/support/read_only_site/sitecustomize.py).
READ_ONLY_SITE = REPO_ROOT / "tests" / "support" / "read_only_site"
READ_ONLY_REFUSAL = "read-only mount: refused"


@dataclass
class LocalPod:
    """One pod of a rendered Deployment run as local processes: its init containers one after
    the other, then its container, each with its command line and environment, ``0.0.0.0``
    replaced by the pod's own loopback address, container ports by the cluster's shared map of
    free local ports (every pod listens on the same ports, on its own address, as in a
    cluster), the model cache claim by a folder all pods share, other volumes by the pod's own
    folders, and ``dns:///`` targets pointed at the test's DNS. A ``readOnly`` mount is
    read-only for the process, as in the pod (file permissions cannot do that for one process
    of a shared folder: an audit hook in the process refuses every write under it)."""

    manifests: Manifests
    deployment: str
    address: str
    ports: dict[int, int]
    dns: ClusterDNS
    root: Path
    log_dir: Path
    process: ServerProcess | None = None
    volumes: dict[str, Path] = field(default_factory=dict)
    pending_inits: list[dict[str, Any]] = field(default_factory=list)
    init_processes: list[ServerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        spec = self.manifests.pod_spec(self.deployment)
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        self.pending_inits = list(spec.get("initContainers", []))
        for container in [*self.pending_inits, self.container]:
            for mount in container["volumeMounts"]:
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

    def _run(self, container: dict[str, Any], name: str, init: bool) -> ServerProcess:
        argv = [self.translate(a) for a in [*container["command"], *container.get("args", [])]]
        env = {
            k: self.translate(v)
            for k, v in self.manifests.environment(
                self.deployment, container["name"] if init else None
            ).items()
        }
        read_only = [
            str(self.volumes[m["mountPath"]])
            for m in container["volumeMounts"]
            if m.get("readOnly") and m["mountPath"] in self.volumes
        ]
        if read_only:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(READ_ONLY_SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
            env["TEST_READ_ONLY_MOUNTS"] = os.pathsep.join(read_only)
        return ServerProcess(
            name, [str(BIN / argv[0]), *argv[1:]], self.log_dir, env={**env, **LLM_TEST_ENV}
        )

    def start(self) -> None:
        """The first init container, or the container; ``wait_ready`` goes on from there."""
        if self.pending_inits:
            init = self.pending_inits.pop(0)
            self.init_processes.append(self._run(init, f"{self.name}-{init['name']}", True))
        else:
            self.process = self._run(self.container, self.name, False)

    def stop(self) -> None:
        for process in [*self.init_processes, *filter(None, [self.process])]:
            process.stop()

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

    def wait_ready(self, init_timeout: float = 300) -> None:
        """Each init container to its successful end, then the container's startup probe
        within its budget (period x failures), then readiness."""
        while self.process is None:
            init = self.init_processes[-1]
            deadline = time.monotonic() + init_timeout
            while init.alive:
                assert time.monotonic() < deadline, f"{init.name} still running:\n{init.log_tail()}"
                time.sleep(0.25)
            assert init.proc.returncode == 0, f"{init.name} failed:\n{init.log_tail()}"
            self.start()
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

    @property
    def api_key(self) -> str:
        return self.manifests.environment("llm")["DVD_API_KEY"]


# Connection age for the local run: short, so that the test waits seconds, not half a minute.
TEST_CONNECTION_AGE_MS = 3_000


@process_fixture(scope="module")
def cpu_cluster(tmp_path_factory, log_dir) -> Iterator[LocalCluster]:
    """The CPU variant, with an operator's overlay that creates the API key's Secret and
    shortens the connection age, running as local processes: one vision pod and one language
    pod."""
    root = tmp_path_factory.mktemp("cluster")
    manifests = user_overlay(
        root / "overlay",
        {
            "namespace": "dvd",  # where the generated Secret must be, next to the pods
            "resources": ["overlays/cpu"],
            "configMapGenerator": [
                {
                    "name": "dvd-vision",
                    "behavior": "merge",
                    "literals": [f"DVD_MAX_CONNECTION_AGE_MS={TEST_CONNECTION_AGE_MS}"],
                }
            ],
            "secretGenerator": [{"name": "dvd-api-key", "literals": ["DVD_API_KEY=sk-cluster"]}],
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
            pod.stop()
        dns_server.close()


def chat_with_image(cluster: LocalCluster, seed: int) -> httpx.Response:
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
    return httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {cluster.api_key}"},
        timeout=120,
    )


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
    reply = chat_with_image(cluster, seed=1)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    assert reply.json()["vision"]["vir"] == "auto"  # DVD_MODEL empty: the tiny Flash model
    assert cluster.vision[0].encoded() >= 1
    # The key from the operator's Secret is required.
    anonymous = httpx.get(f"{cluster.base_url}/v1/models", timeout=10)
    assert anonymous.status_code == 401
    # The model cache claim holds the checkpoint, which the language pod generated; the
    # vision pod, whose mount is read-only, waited for it and never tried to write there.
    (cache,) = {pod.volumes["/cache"] for pod in [*cluster.vision, cluster.llm]}
    assert any((cache / "dvd").iterdir())
    assert cluster.llm.process is not None and cluster.vision[0].process is not None
    assert "wrote tiny" in cluster.llm.process.log_path.read_text()
    vision_log = cluster.vision[0].process.log_path.read_text()
    assert READ_ONLY_REFUSAL not in vision_log and "wrote tiny" not in vision_log
    (wait,) = cluster.vision[0].init_processes
    assert "checkpoint ready" in wait.log_path.read_text()


class Traffic:
    """Chat requests with an image from two client threads, without pause, until stopped."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.statuses: list[int] = []
        self.seconds: list[float] = []  # each request's duration, on this machine, now
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(2)
        self._workers = [self._pool.submit(self._run, worker) for worker in range(2)]

    def _run(self, worker: int) -> None:
        seed = 1000 * (worker + 1)
        while not self._stop.is_set():
            seed += 1
            started = time.monotonic()
            try:
                self.statuses.append(chat_with_image(self.cluster, seed).status_code)
            except httpx.HTTPError:
                self.statuses.append(-1)
            self.seconds.append(time.monotonic() - started)

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
    traffic = Traffic(cluster)
    try:
        wait_for(lambda: first.encoded() >= 3 and len(traffic.seconds) >= 3, 60)
        # gRPC adds up to 10% of jitter to the age; then one re-resolution interval at most,
        # and a connection and a request: twice the slowest request this traffic has had so
        # far, measured here, on this machine under this load.
        slack_s = 2 * max(traffic.seconds)
        bound_s = 1.1 * age_s + DNS_RERESOLUTION_INTERVAL_MS / 1000 + slack_s

        second = cluster.make_pod("vision", "127.0.0.2")
        second.start()
        second.wait_ready()
        cluster.vision.append(second)
        cluster.publish_vision()
        took = wait_for(lambda: second.encoded() > 0, bound_s)
        print(
            f"new vision pod got its first call {took:.1f} s after it joined the Service "
            f"(bound {bound_s:.1f} s, of which {slack_s:.1f} s for a request)"
        )
        # Both keep taking calls (each distinct image's key lands on one of the two).
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
