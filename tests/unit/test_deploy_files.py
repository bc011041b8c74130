"""deploy/, docker-compose.yml and the Dockerfile stay valid and consistent with the code.

Nothing here needs Docker or a cluster. The metric names come from a live registry of the
coordinator, the command lines from the CLI's own parsers, the gate URLs from the app's routes.
Optional tools deepen the checks where installed and skip otherwise: ``promql-parser`` (PromQL
syntax and label names), ``kubernetes-validate`` (Kubernetes schemas, strict), ``promtool``
(Prometheus rule files) and ``docker compose`` (``config -q`` needs no engine).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

with warnings.catch_warnings():
    # Starlette 1.x wants httpx2 for its TestClient and warns (an error here) on httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from pubsub_canary.cli import build_parser
from pubsub_canary.coordinator.api import create_app
from pubsub_canary.coordinator.broker import MemoryBroker
from pubsub_canary.coordinator.metrics import build_registry
from pubsub_canary.coordinator.server import parse_listen
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.store import MemoryStore
from pubsub_canary.core.machine import Phase
from pubsub_canary.core.model import RolloutSpec, load_rollout_spec, parse_rollout_spec
from pubsub_canary.core.observations import CohortObservations
from pubsub_canary.demo import consumer as demo_consumer

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
K8S = DEPLOY / "kubernetes"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), COMPOSE])

#: Series Prometheus makes itself, and labels it adds to every scraped series.
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
#: Grafana's interval variables, which are no PromQL.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@contextmanager
def no_abbreviations() -> Iterator[None]:
    """Parsers take no abbreviated flags: a command line in deploy/ spells every flag in full."""
    original = argparse.ArgumentParser.parse_known_args

    def strict(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        self.allow_abbrev = False  # read at parse time, by subparsers too
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", strict)
        yield


def cli_args(argv: list[str]) -> argparse.Namespace:
    """``pubsub-canary ARGV`` as the CLI parses it, without abbreviations."""
    with no_abbreviations():
        try:
            return build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"pubsub-canary rejects {shlex.join(argv)} (exit {exc.code})")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests(*folders: str) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (p, d)
        for folder in folders
        for p in sorted((DEPLOY / folder).glob("*.yaml"))
        for d in load_docs(p)
        if p.name != "kustomization.yaml"
    ]


def find(kind: str, name: str, folder: str = "kubernetes") -> dict[str, Any]:
    hits = [d for _, d in manifests(folder) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name} in deploy/{folder}, found {len(hits)}"
    return hits[0]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_rollout() -> RolloutSpec:
    path = DEPLOY / "compose" / "rollout.yaml"
    return load_rollout_spec(path.read_text(), source=str(path))


# --- what the code exports --------------------------------------------------------------------


@cache
def exported() -> dict[str, set[str]]:
    """Series name -> label names, from a live coordinator registry (every family populated)."""
    c = Coordinator(
        MemoryStore(), MemoryBroker(topics={"orders": 4}), lease_seconds=30.0, tick_seconds=1
    )
    registry = build_registry(c)
    common = {"transport": "kafka", "topic": "orders", "group_id": "g", "units": 4}
    c.register(**common, cohort="stable", version="1", member_id="s1")
    c.apply_rollout(
        parse_rollout_spec(
            {
                "name": "r",
                "target": {"topic": "orders", "group": "g"},
                "canary_version": "2",
                "steps": [{"share": 50, "hold_seconds": 3600}],
            }
        )
    )
    c.register(**common, cohort="canary", version="2", member_id="c1")
    # s1 releases what the canary is to get: graceful handoffs feed the histogram.
    revoking = [u for u in c.heartbeat("s1")["units"] if u["status"] == "revoking"]
    assert revoking, "no handoff to observe"
    c.release("s1", [(u["unit"], u["epoch"], 10) for u in revoking])
    c.heartbeat("s1", metrics=CohortObservations(processed=10, errors=1, dead_lettered=1))
    c.sample_lag()
    text = generate_latest(registry).decode()

    series: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
        }.get(family.type, ("",))
        for suffix in suffixes:
            series[family.name + suffix]
        for sample in family.samples:
            series[sample.name] |= set(sample.labels)
    assert all(name.startswith("pubsub_canary_") for name in series), sorted(series)
    return dict(series)


@cache
def label_values() -> dict[str, set[str]]:
    """Values of the labels whose value set is fixed by the code."""
    return {
        "phase": {p.value for p in Phase},
        "cohort": {"stable", "canary"},
        "outcome": {"ok", "dead_lettered", "error", "graceful", "lease_expired"},
    }


def test_the_registry_exports_the_documented_metrics() -> None:
    names = set(exported())
    for name in (
        "pubsub_canary_rollout_phase",
        "pubsub_canary_rollout_step",
        "pubsub_canary_rollout_share_ratio",
        "pubsub_canary_units",
        "pubsub_canary_members",
        "pubsub_canary_lag_messages",
        "pubsub_canary_messages_total",
        "pubsub_canary_handoff_seconds_bucket",
    ):
        assert name in names, sorted(names)
    assert {"group", "outcome", "le"} <= exported()["pubsub_canary_handoff_seconds_bucket"]


# --- PromQL -----------------------------------------------------------------------------------


def promql_sources() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression in deploy/."""
    out: list[tuple[str, str]] = []
    dash = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((f"dashboard panel {panel['title']!r} {t['refId']}", t["expr"]))
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            out.append((f"dashboard annotation {ann['name']!r}", ann["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert m, f"dashboard variable {var['name']}: not label_values(SELECTOR, LABEL)"
            out.append((f"dashboard variable {var['name']!r}", f"count by ({m[2]}) ({m[1]})"))
    for path in (DEPLOY / "prometheus" / "rules.yml", K8S / "prometheus-rule.yaml"):
        doc = load_docs(path)[0]
        for group in doc.get("spec", doc)["groups"]:
            for rule in group["rules"]:
                out.append((f"{rel(path)} {rule['alert']}", str(rule["expr"])))
    return out


PROMQL = promql_sources()
PROMQL_IDS = [where for where, _ in PROMQL]


@pytest.mark.parametrize(("where", "expr"), PROMQL, ids=PROMQL_IDS)
def test_promql_uses_only_exported_metric_names(where: str, expr: str) -> None:
    names = set(re.findall(r"\bpubsub_canary_\w+", expr))
    others = set(re.findall(r"\b(\w+)\{", expr)) - names
    assert names or others <= set(PROMETHEUS_SERIES), f"{where}: no pubsub_canary metric"
    unknown = names - set(exported())
    assert not unknown, f"{where}: {sorted(unknown)} not exported; have {sorted(exported())}"


@pytest.mark.parametrize(("where", "expr"), PROMQL, ids=PROMQL_IDS)
def test_promql_parses_and_uses_existing_labels(where: str, expr: str) -> None:
    promql_parser = pytest.importorskip(
        "promql_parser", reason="promql-parser is not installed (pip install promql-parser)"
    )
    try:
        tree = promql_parser.parse(GRAFANA_INTERVALS.sub("5m", expr))
    except ValueError as exc:
        pytest.fail(f"{where}: not PromQL: {exc}\n{expr}")
    selectors: list[Any] = []
    used: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            used.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            used.update(matching.labels if matching is not None else ())

    promql_parser.walk(tree, visit)
    known = {**exported(), **PROMETHEUS_SERIES}
    available = set(TARGET_LABELS)
    for sel in selectors:
        assert sel.name in known, f"{where}: unknown series {sel.name}"
        labels = known[sel.name] | TARGET_LABELS
        available |= labels
        for m in sel.matchers.matchers:
            assert m.name in labels, f"{where}: {sel.name} has no label {m.name!r}"
            values = label_values().get(m.name)
            if values is None or "$" in m.value:
                continue
            literal = m.value.split("|") if "=~" in str(m.op) or "Re" in str(m.op) else [m.value]
            if all(re.fullmatch(r"[\w.-]+", v) for v in literal):
                bad = set(literal) - values
                assert not bad, f"{where}: {m.name} is never {sorted(bad)}; it is one of {values}"
    missing = used - available
    assert not missing, f"{where}: grouping by {sorted(missing)}, which no series here has"


# --- Grafana ----------------------------------------------------------------------------------


def test_dashboard_loads_with_panels_on_the_datasource_variable() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())

    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        x, w = p["gridPos"]["x"], p["gridPos"]["w"]
        assert x >= 0 and x + w <= 24, p["title"]
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", GRAFANA_INTERVALS.sub("", t["expr"])):
                assert var in variables, f"{p['title']}: ${var} is not a dashboard variable"


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    prov = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "pubsub-canary.yml").read_text()
    )
    folder = prov["providers"][0]["options"]["path"]
    dashboard_in_container = mounts["./deploy/grafana/dashboard.json"]
    assert str(Path(dashboard_in_container).parent) == folder
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == (
        dashboard_in_container
    )
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert ds["type"] == "prometheus"
    url = urlsplit(ds["url"])
    assert url.hostname == "prometheus" and "prometheus" in compose()["services"]
    assert f"{url.port}:{url.port}" in compose()["services"]["prometheus"]["ports"]


# --- Prometheus rules -------------------------------------------------------------------------


def test_compose_rules_and_the_prometheusrule_are_the_same() -> None:
    compose_groups = load_docs(DEPLOY / "prometheus" / "rules.yml")[0]["groups"]
    rule = find("PrometheusRule", "pubsub-canary")
    assert rule["spec"]["groups"] == compose_groups


def test_alerts_are_complete_and_uniquely_named() -> None:
    groups = load_docs(DEPLOY / "prometheus" / "rules.yml")[0]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert len(rules) >= 6
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        if "for" in r:
            assert re.fullmatch(r"\d+[smhd]", r["for"]), r["alert"]


def test_the_down_alert_selects_the_scrape_job() -> None:
    groups = load_docs(DEPLOY / "prometheus" / "rules.yml")[0]["groups"]
    jobs = {
        job
        for g in groups
        for r in g["rules"]
        for job in re.findall(r'up\{job="([^"]+)"\}', str(r["expr"]))
    }
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # Kubernetes: a ServiceMonitor's job label is the Service's name.
    assert jobs == {prom["scrape_configs"][0]["job_name"]}
    assert jobs == {find("Service", "pubsub-canary-coordinator")["metadata"]["name"]}


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    r = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# --- YAML, Kubernetes -------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=[rel(p) for p in YAML_FILES])
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), rel(path)


KNOWN_KINDS = {
    "v1": {"Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Service"},
    "apps/v1": {"Deployment"},
    "monitoring.coreos.com/v1": {"ServiceMonitor", "PrometheusRule"},
    "argoproj.io/v1alpha1": {"AnalysisTemplate"},
    "flagger.app/v1beta1": {"Canary"},
}
MANIFESTS = manifests("kubernetes", "argo", "flagger")
MANIFEST_IDS = [
    f"{rel(p)}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for p, d in MANIFESTS
]


@pytest.mark.parametrize(("path", "doc"), MANIFESTS, ids=MANIFEST_IDS)
def test_manifest_structure(path: Path, doc: dict[str, Any]) -> None:
    assert doc["kind"] in KNOWN_KINDS.get(doc["apiVersion"], set()), (
        f"{rel(path)}: unexpected {doc['apiVersion']} {doc['kind']}"
    )
    meta = doc["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]
    if doc["kind"] == "Deployment":
        spec = doc["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        for c in spec["template"]["spec"]["containers"]:
            assert c["image"] and c["resources"]["requests"], c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize(("path", "doc"), MANIFESTS, ids=MANIFEST_IDS)
def test_manifest_matches_the_kubernetes_schema(path: Path, doc: dict[str, Any]) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
    )
    if doc["apiVersion"] not in ("v1", "apps/v1"):
        pytest.skip(f"{doc['kind']} is a custom resource: no schema ships with the validator")
    try:
        kv.validate(doc, "1.30", strict=True)
    except kv.ValidationError as exc:
        pytest.fail(f"{rel(path)} {doc['kind']}: {exc.message} at {list(exc.path)}")


def test_kustomization_lists_every_manifest() -> None:
    kust = load_docs(K8S / "kustomization.yaml")[0]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], value)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env |= find("ConfigMap", src["configMapRef"]["name"])["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


def app_paths() -> set[str]:
    c = Coordinator(MemoryStore(), MemoryBroker())
    return {getattr(r, "path", "") for r in create_app(c, manage_lifecycle=False).routes}


def test_coordinator_deployment_runs_the_cli_consistently() -> None:
    dep = find("Deployment", "pubsub-canary-coordinator")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = container_env(c)
    argv = [expand(a, env) for a in [*c["command"], *c["args"]]]
    assert argv[0] == "pubsub-canary"
    args = cli_args(argv[1:])

    assert args.command == "coordinator"
    _, port = parse_listen(args.listen)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": port}
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    # The CLI reads the bootstrap servers from this variable when --bootstrap-servers is absent.
    assert env["PUBSUB_CANARY_KAFKA_BOOTSTRAP"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
        assert c[probe]["httpGet"]["path"] in app_paths()
    # The SQLite file lives on the data volume, which is the PVC.
    assert args.store.startswith("sqlite:///")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert Path(args.store[len("sqlite:///") :]).parent == Path(mounts["data"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", claim)
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()


def test_rollout_in_the_configmap_is_valid_and_the_compose_one() -> None:
    data = find("ConfigMap", "pubsub-canary-rollouts")["data"]
    specs = {key: load_rollout_spec(text, source=key) for key, text in data.items()}
    assert specs == {"orders-v1-5.yaml": compose_rollout()}


def test_service_and_servicemonitor_reach_the_coordinator() -> None:
    svc = find("Service", "pubsub-canary-coordinator")
    dep = find("Deployment", "pubsub-canary-coordinator")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == 8470

    mon = find("ServiceMonitor", "pubsub-canary-coordinator")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["namespace"] in mon["spec"]["namespaceSelector"]["matchNames"]
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] in app_paths()


def coordinator_url_ok(url: str) -> None:
    """``url`` reaches the coordinator's Service (any namespace form) on its port."""
    svc = find("Service", "pubsub-canary-coordinator")
    parts = urlsplit(url)
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    assert parts.hostname in (name, f"{name}.{ns}", f"{name}.{ns}.svc"), url
    assert parts.port == svc["spec"]["ports"][0]["port"], url


def consumer_kwargs(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What ``python -m pubsub_canary.demo.consumer ARGV`` hands to KafkaMember (nothing runs)."""
    seen: dict[str, Any] = {}

    class FakeMember:
        member_id = "fake"
        on_processed = None

        def __init__(self, handler: Any, **kwargs: Any) -> None:
            seen.update(kwargs)

        def run(self) -> None:
            pass

    class FakeLedger:
        def __init__(self, path: str) -> None:
            seen["ledger"] = path

    with monkeypatch.context() as m:
        m.setattr(demo_consumer, "KafkaMember", FakeMember)
        m.setattr(demo_consumer, "Ledger", FakeLedger)
        m.setattr(demo_consumer.logging, "basicConfig", lambda **_: None)
        m.setattr(sys, "argv", ["consumer", *argv])
        try:
            with no_abbreviations():
                assert demo_consumer.main() == 0
        except SystemExit as exc:
            pytest.fail(f"the demo consumer rejects {shlex.join(argv)} (exit {exc.code})")
    return seen


def assert_member_of(kwargs: dict[str, Any], spec: RolloutSpec, cohort: str) -> None:
    assert kwargs["cohort"] == cohort
    version = spec.stable_version if cohort == "stable" else spec.canary_version
    assert kwargs["version"] == version
    assert (kwargs["topic"], kwargs["group_id"]) == (spec.target.topic, spec.target.group)
    assert kwargs["dead_letter_topic"] == spec.target.dead_letter_topic


@pytest.mark.parametrize("cohort", ["stable", "canary"])
def test_example_consumer_deployments_join_the_rollouts_group(
    cohort: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = find("Deployment", f"orders-consumer-{cohort}")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = container_env(c)
    argv = [expand(a, env) for a in [*c["command"], *c["args"]]]
    assert argv[:3] == ["python", "-m", "pubsub_canary.demo.consumer"]

    kwargs = consumer_kwargs(argv[3:], monkeypatch)

    assert_member_of(kwargs, compose_rollout(), cohort)
    coordinator_url_ok(kwargs["coordinator"])
    assert (
        kwargs["bootstrap_servers"]
        == find("ConfigMap", "pubsub-canary-coordinator")["data"]["PUBSUB_CANARY_KAFKA_BOOTSTRAP"]
    )


# --- Argo Rollouts and Flagger ----------------------------------------------------------------


@pytest.fixture
def gate_client() -> Any:
    """The app, with the rollout the deploy files name applied (no member yet)."""
    c = Coordinator(MemoryStore(), MemoryBroker(topics={"orders": 12}))
    spec = compose_rollout()
    c.apply_rollout(spec)
    with TestClient(create_app(c, manage_lifecycle=False)) as client:
        yield client


def test_argo_analysis_template_reads_a_boolean_the_gate_serves(gate_client: Any) -> None:
    tmpl = find("AnalysisTemplate", "pubsub-canary-verdict", "argo")
    args = {a["name"]: a.get("value") for a in tmpl["spec"]["args"]}
    assert "rollout" in args and args["rollout"] is None  # the Rollout passes it
    args["rollout"] = compose_rollout().name
    (metric,) = tmpl["spec"]["metrics"]
    web = metric["provider"]["web"]
    assert set(web) <= {"url", "jsonPath", "timeoutSeconds", "headers", "method", "body"}
    url = re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda m: args[m[1]], web["url"])
    coordinator_url_ok(url)
    assert metric["successCondition"] == "result == true"
    m = re.fullmatch(r"\{\$\.(\w+)\}", web["jsonPath"])
    assert m, web["jsonPath"]

    r = gate_client.get(urlsplit(url).path)

    assert r.status_code == 200, r.text
    assert r.json()[m[1]] is True


#: Flagger hook type -> the gate it must call.
FLAGGER_GATES = {
    "confirm-rollout": "/v1/gates/flagger/start",
    "pre-rollout": "/v1/gates/flagger",
    "rollout": "/v1/gates/flagger",
    "confirm-traffic-increase": "/v1/gates/flagger",
    "confirm-promotion": "/v1/gates/flagger/promotion",
    "rollback": "/v1/gates/flagger/rollback",
}


def test_flagger_canary_hooks_call_the_right_gates(gate_client: Any) -> None:
    canary = find("Canary", "orders-consumer", "flagger")
    hooks = canary["spec"]["analysis"]["webhooks"]
    assert {h["type"] for h in hooks} >= {"confirm-rollout", "rollout", "confirm-promotion"}
    expected = {"rollout": 200, "confirm-rollout": 200, "confirm-promotion": 412, "rollback": 412}
    for h in hooks:
        coordinator_url_ok(h["url"])
        path = urlsplit(h["url"]).path
        assert path == FLAGGER_GATES[h["type"]], h["name"]
        assert h["metadata"]["rollout"] == compose_rollout().name
        payload = {
            "name": canary["metadata"]["name"],
            "namespace": "orders",
            "phase": "Progressing",
        }

        r = gate_client.post(path, json=payload | {"metadata": h["metadata"]})

        assert r.status_code == expected[h["type"]], (h["name"], r.text)


def test_flagger_deployment_picks_its_cohort_from_the_app_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = find("Deployment", "orders-consumer", "flagger")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["/bin/sh", "-c"]
    (script,) = c["args"]
    # A stand-in `python` records the command line the script would exec.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **container_env(c)}
    spec = compose_rollout()
    for app, cohort in (("orders-consumer", "canary"), ("orders-consumer-primary", "stable")):
        out = subprocess.run(
            ["/bin/sh", "-c", script],
            env=env | {"APP": app},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
        assert out[:2] == ["-m", "pubsub_canary.demo.consumer"]

        kwargs = consumer_kwargs(out[2:], monkeypatch)

        assert kwargs["cohort"] == cohort
        assert kwargs["version"] == spec.canary_version  # the release under test
        assert (kwargs["topic"], kwargs["group_id"]) == (spec.target.topic, spec.target.group)
        coordinator_url_ok(kwargs["coordinator"])


# --- docker-compose and the Dockerfile --------------------------------------------------------


def compose_command(service: str) -> list[str]:
    cmd = compose()["services"][service]["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def published(service: str) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in compose()["services"][service].get("ports", []):
        host, container = str(p).rsplit(":", 1)
        out[int(container)] = int(host.rsplit(":", 1)[-1])
    return out


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert set(services) >= {
        "kafka",
        "kafka-init",
        "pubsub-emulator",
        "coordinator",
        "consumer-stable",
        "consumer-canary",
        "producer",
        "prometheus",
        "grafana",
    }
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    emulator = services["pubsub-emulator"]
    assert emulator["image"] == "gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators"
    assert "--host-port=0.0.0.0:8085" in emulator["command"]
    assert published("pubsub-emulator") == {8085: 8085}


def test_compose_coordinator_command_is_accepted_by_the_cli() -> None:
    svc = compose()["services"]["coordinator"]
    argv = compose_command("coordinator")
    assert argv[0] == "pubsub-canary"

    args = cli_args(argv[1:])

    assert args.command == "coordinator"
    host, port = parse_listen(args.listen)
    assert host == "0.0.0.0" and port in published("coordinator")
    assert args.bootstrap_servers == "kafka:9092"
    assert "PLAINTEXT://kafka:9092" in compose()["services"]["kafka"]["environment"][
        "KAFKA_ADVERTISED_LISTENERS"
    ].split(",")
    store = args.store[len("sqlite:///") :]
    volumes = dict(v.split(":")[:2] for v in svc["volumes"])
    assert str(Path(store).parent) == volumes["coordinator-data"]
    assert "coordinator-data" in compose()["volumes"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(svc["healthcheck"]["test"])
    assert "/healthz" in app_paths()


def test_compose_rollout_file_is_mounted_and_valid() -> None:
    volumes = compose()["services"]["coordinator"]["volumes"]
    assert any(v.startswith("./deploy/compose/rollout.yaml:") for v in volumes)
    spec = compose_rollout()
    assert spec.target.transport.value == "kafka"


@pytest.mark.parametrize("cohort", ["stable", "canary"])
def test_compose_consumers_are_accepted_by_the_demo_consumer(
    cohort: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = compose_command(f"consumer-{cohort}")
    assert argv[:3] == ["python", "-m", "pubsub_canary.demo.consumer"]

    kwargs = consumer_kwargs(argv[3:], monkeypatch)

    assert_member_of(kwargs, compose_rollout(), cohort)
    url = urlsplit(kwargs["coordinator"])
    _, port = parse_listen(cli_args(compose_command("coordinator")[1:]).listen)
    assert (url.hostname, url.port) == ("coordinator", port)
    assert kwargs["bootstrap_servers"] == "kafka:9092"


def test_compose_creates_the_topics_the_consumers_use() -> None:
    (script,) = compose_command("kafka-init")[-1:]
    created = set(re.findall(r"--topic\s+(\S+)", script))
    spec = compose_rollout()
    assert {spec.target.topic, spec.target.dead_letter_topic} <= created


def test_compose_producer_snippet_imports_what_exists() -> None:
    argv = compose_command("producer")
    assert argv[:2] == ["python", "-c"]
    tree = ast.parse(argv[2])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
    assert f"'{compose_rollout().target.topic}'" in argv[2] and "'kafka:9092'" in argv[2]


def test_compose_prometheus_scrapes_the_coordinator_and_loads_the_rules() -> None:
    prom_svc = compose()["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom_svc["volumes"])
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == [mounts["./deploy/prometheus/rules.yml"]]
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] in app_paths()
    _, port = parse_listen(cli_args(compose_command("coordinator")[1:]).listen)
    assert job["static_configs"][0]["targets"] == [f"coordinator:{port}"]


def test_compose_host_paths_exist() -> None:
    for name, svc in compose()["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: {src} does not exist"
        build = svc.get("build")
        if build:
            assert (ROOT / build / "Dockerfile").exists()


def dockerfile_uid() -> int:
    m = re.search(r"useradd[^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert m, "the Dockerfile creates no user with a fixed uid"
    return int(m[1])


def test_dockerfile_builds_the_image_the_manifests_use() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert 'pip install ".[all]"' in text
    cmd = json.loads(re.search(r"^CMD (\[.*?\])$", text.replace("\\\n", ""), re.M | re.S)[1])
    args = cli_args(cmd[1:])
    _, port = parse_listen(args.listen)
    assert f"EXPOSE {port}" in text
    assert f"USER {dockerfile_uid()}" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignored and "!pubsub_canary/" in ignored and "!pyproject.toml" in ignored
    image = compose()["services"]["coordinator"]["image"]
    assert (
        find("Deployment", "pubsub-canary-coordinator")["spec"]["template"]["spec"]["containers"][
            0
        ]["image"]
        == image
    )


def test_compose_file_matches_the_compose_specification_schema() -> None:
    pytest.importorskip(
        "check_jsonschema",
        reason="check-jsonschema (which ships the Compose Specification's schema) is not installed",
    )
    import jsonschema

    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if version.returncode != 0:
        pytest.skip("the docker client has no compose plugin (docker compose version failed)")
    r = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
