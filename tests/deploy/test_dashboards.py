"""The Grafana dashboards (deploy/grafana) and their wiring: the Compose monitoring profile,
the Prometheus configuration and the Kubernetes component.

Every series a dashboard's queries name is looked up on a live scrape of the service that
dashboard shows, both services running as real processes, so a renamed or removed series
fails here instead of leaving an empty panel. The names come from the queries by a small
PromQL tokenizer: identifiers that are not functions or aggregations (followed by ``(``),
keywords, label names (inside ``{}`` and grouping lists) or durations.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from helpers import REPO_ROOT, data_url, noise_image, process_fixture, start_stacks

GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
# Which service's /metrics page each dashboard reads.
SERVICE_OF = {"dvd-language.json": "llm", "dvd-vision.json": "vision"}
KUSTOMIZE = REPO_ROOT / "deploy" / "kubernetes"

# ---- PromQL ---------------------------------------------------------------------------------

FUNCTIONS = set(
    "abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes "
    "clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year "
    "days_in_month deg delta deriv exp floor histogram_avg histogram_count histogram_fraction "
    "histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour "
    "idelta increase irate label_join label_replace last_over_time ln log10 log2 "
    "mad_over_time max_over_time min_over_time minute month pi predict_linear "
    "present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort "
    "sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time "
    "sum_over_time tan tanh time timestamp vector year".split()
)
AGGREGATIONS = set(
    "avg bottomk count count_values group limit_ratio limitk max min quantile stddev stdvar "
    "sum topk".split()
)
KEYWORDS = {"and", "or", "unless", "atan2", "bool", "offset", "start", "end"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
LITERALS = {"inf", "nan"}
# Labels Prometheus attaches to every series of a target, not on the page it scrapes.
TARGET_LABELS = {"instance", "job"}

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w:]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<identifier>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<operator>==|!=|>=|<=|=~|!~|[-+*/%^=<>(){}\[\],:@])
    """,
    re.VERBOSE,
)
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
_RANGE = re.compile(rf"{_DURATION}(?::{_DURATION}?)?")
# Grafana's interval variables stand where PromQL wants a duration.
_INTERVAL_VARIABLE = re.compile(r"\$(?:__rate_interval|__interval|__range)\b")


@dataclass
class Selector:
    """One vector selector: its metric name and the label matchers it names."""

    metric: str
    labels: set[str] = field(default_factory=set)


@dataclass
class Query:
    selectors: list[Selector]
    grouping_labels: set[str]

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def _tokens(expr: str) -> list[tuple[str, str]]:
    text = _INTERVAL_VARIABLE.sub("5m", expr)
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {text[position:]!r} in {expr!r}")
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def parse_query(expr: str) -> Query:
    """The vector selectors of a PromQL expression (Grafana's interval variables allowed),
    and the labels of its grouping clauses. Raises on what is not PromQL as far as names go:
    an unknown function, an unbalanced bracket, a stray character."""
    tokens = _tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    depth = 0  # of parentheses
    i = 0

    def following(j: int) -> str:
        return tokens[j][1] if j < len(tokens) else ""

    def matchers(j: int) -> tuple[set[str], str | None, int]:
        """The label names of the ``{...}`` at ``j`` (and a ``__name__="x"`` metric), and
        the index after it."""
        assert tokens[j][1] == "{"
        labels: set[str] = set()
        name: str | None = None
        j += 1
        while tokens[j][1] != "}":
            label_kind, label = tokens[j]
            op, value = tokens[j + 1][1], tokens[j + 2]
            if label_kind != "identifier" or op not in ("=", "!=", "=~", "!~"):
                raise ValueError(f"bad label matcher at {label!r} in {expr!r}")
            if value[0] != "string":
                raise ValueError(f"label value of {label!r} is not a string in {expr!r}")
            if label == "__name__" and op == "=":
                name = value[1][1:-1]
            else:
                labels.add(label)
            j += 3
            if tokens[j][1] == ",":
                j += 1
        return labels, name, j + 1

    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "operator":
            if text == "(":
                depth += 1
            elif text == ")":
                depth -= 1
                if depth < 0:
                    raise ValueError(f"unbalanced ')' in {expr!r}")
            elif text == "[":  # a range or subquery: durations only
                end = next((j for j in range(i, len(tokens)) if tokens[j][1] == "]"), None)
                if end is None:
                    raise ValueError(f"unclosed '[' in {expr!r}")
                if not _RANGE.fullmatch("".join(t for _, t in tokens[i + 1 : end])):
                    raise ValueError(f"bad range in {expr!r}")
                i = end + 1
                continue
            elif text == "]":
                raise ValueError(f"unbalanced ']' in {expr!r}")
            elif text == "{":  # a selector with no metric name before it
                labels, name, i = matchers(i)
                if name is None:
                    raise ValueError(f"a selector without a metric name in {expr!r}")
                selectors.append(Selector(name, labels))
                continue
            i += 1
            continue
        if kind != "identifier":
            i += 1
            continue
        lowered = text.lower()
        if lowered in GROUPING:
            i += 1
            if following(i) == "(":  # a list of label names
                i += 1
                while following(i) != ")":
                    if tokens[i][0] == "identifier":
                        grouping.add(tokens[i][1])
                    elif tokens[i][1] != ",":
                        raise ValueError(f"bad label list after {text!r} in {expr!r}")
                    i += 1
                i += 1
            elif lowered in ("by", "without", "on", "ignoring"):
                raise ValueError(f"{text!r} without its label list in {expr!r}")
            continue
        if following(i + 1) == "(" or (lowered in AGGREGATIONS and following(i + 1) in GROUPING):
            if text not in FUNCTIONS and text not in AGGREGATIONS:
                raise ValueError(f"unknown function {text!r} in {expr!r}")
            i += 1
            continue
        if lowered in KEYWORDS or lowered in LITERALS:
            i += 1
            continue
        # A metric name, with or without matchers.
        if following(i + 1) == "{":
            labels, name, i = matchers(i + 1)
            if name is not None:
                raise ValueError(f"{text!r} names its metric twice in {expr!r}")
            selectors.append(Selector(text, labels))
        else:
            selectors.append(Selector(text))
            i += 1
    if depth:
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    return Query(selectors, grouping)


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def variable_query(variable: dict[str, Any]) -> Query | None:
    """The series a query variable reads (``label_values(selector, label)``)."""
    if variable.get("type") != "query":
        return None
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = _LABEL_VALUES.match(text.strip())
    assert match, f"variable {variable['name']}: {text!r} is not label_values(selector, label)"
    return parse_query(match.group("selector"))


def test_the_tokenizer_finds_metric_names():
    """The tokenizer on the shapes the dashboards use, and the mistakes it must catch."""
    query = parse_query(
        "histogram_quantile(0.99, sum by (le, instance) (rate(a:b_seconds_bucket{instance=~"
        '"$instance", route!="/x"}[$__rate_interval])))'
        " / on (instance) group_left sum without (job) (c_total offset 5m)"
        ' + ignoring(status) {__name__="d", x="1"} and e * 1e3 > bool inf'
    )
    assert query.metrics == {"a:b_seconds_bucket", "c_total", "d", "e"}
    assert query.grouping_labels == {"le", "instance", "job", "status"}
    (first,) = [s for s in query.selectors if s.metric == "a:b_seconds_bucket"]
    assert first.labels == {"instance", "route"}
    assert parse_query("sum(rate(x[5m:1m]))").metrics == {"x"}
    assert parse_query("max_over_time(y[1h30m])").metrics == {"y"}
    assert parse_query('count_values("v", z)').metrics == {"z"}
    for broken in (
        "rat(x[5m])",  # a misspelt function
        "sum(rate(x[5m])",  # unbalanced
        "rate(x[5q])",  # not a duration
        "sum by le (x)",  # a grouping without its list
        '{job="x"}',  # no metric name
        "x # y",
    ):
        with pytest.raises(ValueError):
            parse_query(broken)


# ---- the dashboards as files -------------------------------------------------------------


def dashboard(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included (a collapsed row holds its panels)."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> Iterator[tuple[str, Query]]:
    """(where, query) for every panel target and query variable of a dashboard."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"{panel['title']!r} {target['refId']}", parse_query(target["expr"])
    for variable in board["templating"]["list"]:
        query = variable_query(variable)
        if query is not None:
            yield f"variable {variable['name']}", query


def test_the_dashboards_are_the_expected_files():
    assert [p.name for p in DASHBOARDS] == sorted(SERVICE_OF)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_has_a_data_source_and_a_query(path):
    board = dashboard(path)
    assert board["uid"] == path.stem and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    # The data source is a variable: the same file works with any Prometheus a Grafana has.
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    ids, titles = set(), set()
    contents = [p for p in panels(board) if p["type"] != "row"]
    assert len(contents) >= 15
    for panel in panels(board):
        assert panel["id"] not in ids, panel["title"]
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["title"] not in titles, panel["title"]
        titles.add(panel["title"])
        assert panel["datasource"] == source, panel["title"]
        assert panel.get("description"), panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target.get("datasource", source) == source, panel["title"]
            assert target["expr"].strip(), panel["title"]
            query = parse_query(target["expr"])
            assert query.metrics, (panel["title"], target["expr"])
            # Every selector is narrowed to the chosen instances: without it, series of the
            # same name from the other service (process_*) would mix in.
            for selector in query.selectors:
                assert "instance" in selector.labels, (panel["title"], target["expr"])
    # Panels must not overlap on the grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        grid = panel["gridPos"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, panel["title"]
        cells |= covered


# ---- Compose and Prometheus ---------------------------------------------------------------


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text()))


def flag(command: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
    return value


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """The service's bind mounts from this repository: container path -> repository path."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = REPO_ROOT / source
    return mounts


def test_the_monitoring_profile():
    """Prometheus and Grafana run only with `--profile monitoring`, from pinned official
    images, with the files of this repository; the services themselves run without it."""
    services = compose()["services"]
    assert "profiles" not in services["vision"] and "profiles" not in services["llm"]
    images = {"prometheus": "prom/prometheus", "grafana": "grafana/grafana"}
    for name, image in images.items():
        service = services[name]
        assert service["profiles"] == ["monitoring"]
        repository, tag = service["image"].split(":")
        assert repository == image
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a release, not {tag!r}"
        for container_path, repository_path in bind_mounts(service).items():
            assert repository_path.exists(), (name, container_path)
        # Published on this host's loopback only, like the API.
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), port
    assert set(compose()["volumes"]) >= {"prometheus-data", "grafana-data"}

    grafana = bind_mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dvd.yaml").read_text())
    (provider,) = providers["providers"]
    assert grafana[provider["options"]["path"]] == GRAFANA / "dashboards"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).relative_to(provider["options"]["path"])).exists()
    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    (source,) = sources["datasources"]
    prometheus = services["prometheus"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in prometheus["ports"])
    config = bind_mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert config == REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"


def test_prometheus_scrapes_both_services_where_they_serve_metrics():
    """The scrape targets are the Compose services' names and the ports their commands give:
    the language service's API port, every vision replica's metrics port."""
    services = compose()["services"]
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"dvd-llm", "dvd-vision"}
    llm = jobs["dvd-llm"]
    (static,) = llm["static_configs"]
    assert static["targets"] == [f"llm:{flag(services['llm']['command'], 'port')}"]
    vision = jobs["dvd-vision"]
    (discovery,) = vision["dns_sd_configs"]
    # One target per replica (`--scale vision=N`): the service name's A records.
    assert discovery["names"] == ["vision"] and discovery["type"] == "A"
    assert discovery["port"] == int(flag(services["vision"]["command"], "metrics-port"))
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"


# ---- Kubernetes -----------------------------------------------------------------------------


def kustomize_overlay(folder: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """An operator's overlay in ``folder`` on top of ours, rendered by `kubectl kustomize`."""
    assert shutil.which("kubectl"), "kubectl (with its built-in kustomize) is needed"
    folder.mkdir(parents=True)
    document = dict(kustomization)
    for key in ("resources", "components"):
        document[key] = [os.path.relpath(KUSTOMIZE / p, folder) for p in document.get(key, [])]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(document))
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def test_the_kubernetes_monitoring_component(tmp_path):
    """components/monitoring adds the dashboards as the ConfigMap Grafana's sidecar loads
    and a PodMonitor per service, each on the port and path the pods serve metrics on."""
    objects = kustomize_overlay(
        tmp_path / "monitored",
        {"resources": ["overlays/cpu"], "components": ["components/monitoring"]},
    )
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    dashboards = by_kind["ConfigMap"]["dvd-dashboards"]
    kubernetes_validate.validate(dashboards, "1.37", strict=True)
    assert dashboards["metadata"]["namespace"] == "dvd"
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["data"] == {p.name: p.read_text() for p in DASHBOARDS}
    # A ConfigMap holds at most 1 MiB.
    assert len(json.dumps(dashboards["data"])) < 1 << 20

    monitors = by_kind["PodMonitor"]
    assert set(monitors) == {"vision", "llm"}
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["namespace"] == "dvd"
        deployment = by_kind["Deployment"][name]
        template = deployment["spec"]["template"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items(), name
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        # The same port and path as the pods' prometheus.io/* annotations.
        annotations = template["metadata"]["annotations"]
        assert ports[endpoint["port"]] == int(annotations["prometheus.io/port"]), name
        assert endpoint["path"] == annotations["prometheus.io/path"], name
        # The network policies admit Prometheus (namespace "monitoring") on that port.
        admitted = [
            rule
            for policy in by_kind["NetworkPolicy"].values()
            if policy["spec"]["podSelector"].get("matchLabels", {}).items()
            <= template["metadata"]["labels"].items()
            for rule in policy["spec"].get("ingress", [])
            if any(
                peer.get("namespaceSelector", {}).get("matchLabels")
                == {"kubernetes.io/metadata.name": "monitoring"}
                for peer in rule.get("from", [])
            )
        ]
        assert any(
            p["port"] in (endpoint["port"], ports[endpoint["port"]])
            for rule in admitted
            for p in rule["ports"]
        ), name

    # An overlay's namespace moves the component's objects with the rest.
    moved = kustomize_overlay(
        tmp_path / "moved",
        {
            "namespace": "inference",
            "resources": ["overlays/gpu"],
            "components": ["components/monitoring"],
        },
    )
    assert {o["metadata"].get("namespace") for o in moved if o["kind"] != "Namespace"} == {
        "inference"
    }


# ---- the series on a live scrape ------------------------------------------------------------


@dataclass
class Scrape:
    """One /metrics page: every sample name with the label names it carries, and every
    family declared by a TYPE line (a labelled series not used yet has no samples)."""

    samples: dict[str, set[str]]
    declared: set[str]

    @classmethod
    def of(cls, page: str) -> Scrape:
        samples: dict[str, set[str]] = {}
        declared: set[str] = set()
        for line in page.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                declared.add(name)
                if kind == "histogram":
                    declared |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                elif kind == "counter" and not name.endswith("_total"):
                    declared.add(f"{name}_total")
                continue
            if not line or line.startswith("#"):
                continue
            match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
            assert match, line
            labels = set(re.findall(r'([a-zA-Z_]\w*)="(?:[^"\\]|\\.)*"', match.group(2) or ""))
            samples.setdefault(match.group(1), set()).update(labels)
        return cls(samples, declared)

    def has(self, name: str) -> bool:
        return name in self.samples or name in self.declared


@process_fixture(scope="module")
def scrapes(tiny_flash_models: dict[str, Path], log_dir: Path) -> Iterator[dict[str, Scrape]]:
    """Both services on the tiny Flash checkpoint (router series), after the same image was
    asked for twice (an encode, then an embedding cache hit): service -> its /metrics."""
    stacks = start_stacks({"monitored": tiny_flash_models["hf"]}, log_dir)
    stack = stacks["monitored"]
    try:
        image = data_url(noise_image(300, 200, seed=7))
        for _ in range(2):
            reply = httpx.post(
                f"{stack.base_url}/v1/chat/completions",
                json={
                    "model": "dvd-tiny-internvl",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": image}},
                                {"type": "text", "text": "What is this?"},
                            ],
                        }
                    ],
                    "max_tokens": 4,
                },
                timeout=120,
            )
            assert reply.status_code == 200, reply.text
        assert stack.vision is not None and stack.vision.metrics_url
        yield {
            "llm": Scrape.of(httpx.get(f"{stack.base_url}/metrics", timeout=10).text),
            "vision": Scrape.of(httpx.get(stack.vision.metrics_url, timeout=10).text),
        }
    finally:
        stack.stop()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_series_a_dashboard_reads_is_exported(scrapes, path):
    """Every metric name in the dashboard's queries is on its service's /metrics page, and
    every label a selector or grouping names is a label that page carries (or one Prometheus
    adds to every target)."""
    scrape = scrapes[SERVICE_OF[path.name]]
    # The scrape is not empty of what matters: the image requests moved the counters.
    assert scrape.samples, "nothing scraped"
    assert not scrape.has("dvd:no_such_series_total")
    missing: list[str] = []
    wrong_labels: list[str] = []
    used: set[str] = set()
    for where, query in queries(dashboard(path)):
        for selector in query.selectors:
            used.add(selector.metric)
            if not scrape.has(selector.metric):
                missing.append(f"{where}: {selector.metric}")
                continue
            known = scrape.samples.get(selector.metric)
            if known is not None:
                unknown = selector.labels - known - TARGET_LABELS
                if unknown:
                    wrong_labels.append(f"{where}: {selector.metric} has no {sorted(unknown)}")
        # Grouped series carry the labels they are grouped by (checked where every series
        # of the query has samples: a labelled series not used yet shows no labels).
        if all(m in scrape.samples for m in query.metrics):
            carried = set().union(*(scrape.samples[m] for m in query.metrics))
            unknown = query.grouping_labels - carried - TARGET_LABELS
            if unknown:
                wrong_labels.append(f"{where}: grouping by {sorted(unknown)}")
    assert not missing, "series not exported:\n" + "\n".join(missing)
    assert not wrong_labels, "\n".join(wrong_labels)
    # Each dashboard reads most of its service's own series (dvd:* and, for the language
    # service, vllm:*): a dashboard that lost its panels would show here.
    own = {"llm": ("dvd:", "vllm:"), "vision": ("dvd:vision_",)}[SERVICE_OF[path.name]]
    assert len({m for m in used if m.startswith(own)}) >= 20, sorted(used)


def test_the_monitoring_overlay_in_the_docs(tmp_path):
    """docs/deploy.md's overlay with components/monitoring renders, as if it sat next to a
    clone of this repository, and holds the dashboards and both PodMonitors."""
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    (block,) = [
        b
        for b in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL)
        if "kind: Kustomization" in b and "components/monitoring" in b
    ]
    folder = tmp_path / "my-overlay"
    folder.mkdir()
    prefix = os.path.relpath(KUSTOMIZE, folder)
    (folder / "kustomization.yaml").write_text(block.replace("../dvd/deploy/kubernetes", prefix))
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("ConfigMap", "dvd-dashboards"), ("PodMonitor", "vision"), ("PodMonitor", "llm")} <= (
        names
    )
