#!/usr/bin/env python3
"""Checks the Helm chart without a helm binary or a cluster.

Helm's own library (the PyPI wheel helm-python-sdk) lints the chart, validates values against
values.schema.json and renders it; kubernetes-validate checks every rendered object against the
Kubernetes API's schemas. The renderings of the default values and of the production-like values
(helm/forfall/ci/production-values.yaml) are kept as golden files in helm/golden/: a change to
the chart shows up as a diff there (`--update` rewrites them after a deliberate change).

Each check prints one line; the script exits 1 if any failed. `--render NAME OUT` writes the
rendering of one values file (default or production) for other tests to read, `--config-files NAME
DIR` the files of its configuration ConfigMap (forfall.json, policy.toml).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import yaml

import helm_python as helm
import kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "forfall"
GOLDEN = ROOT / "helm" / "golden"
RELEASE = "forfall"
NAMESPACE = "collections"
COMPONENTS = ["ingest", "watcher", "dispatch", "matcher", "handoff", "portal"]
PORT_OFFSETS = {"ingest": 1, "watcher": 2, "dispatch": 3, "matcher": 4, "handoff": 5, "portal": 6}
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest schemas known.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Custom resources of operators the chart can target; the Kubernetes schemas do not know them.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|API_KEY)$")


def values_of(name: str) -> dict:
    if name == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def render(values: dict) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def as_text(rendered: dict[str, str]) -> str:
    """The rendering as `helm template` prints it: each template's documents under its source."""
    parts = []
    for source in sorted(rendered):
        if source.endswith("NOTES.txt"):
            continue
        for doc in re.split(r"(?m)^---\s*$", rendered[source]):
            if doc.strip():
                parts.append(f"---\n# Source: {source}\n{doc.strip()}\n")
    return "".join(parts)


def objects(rendered: dict[str, str]) -> list[dict]:
    found = []
    for source in sorted(rendered):
        if source.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[source]):
            if doc:
                found.append(doc)
    return found


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def refused(values: dict) -> str:
    """The error rendering `values` gives (schema or template), or '' when it renders."""
    with helm.Chart.load(str(CHART)) as chart:
        try:
            chart.validate_schema(values)
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmError as error:
            return str(error)
    return ""


# Values documented as one row of the README's table: free-form maps, or Kubernetes' own shapes.
OPAQUE = {
    "config", "podSecurityContext", "securityContext", "probes.liveness", "probes.readiness",
    "probes.startup", "components.<name>.resources", "components.<name>.ingress",
    "networkPolicy.metricsFrom", "serviceMonitor.labels", "prometheusRule.labels", "dashboards.labels",
}


def documented_name(path: str) -> str:
    """A value's row in the README: the six components share one shape, documented once."""
    if path == "components.handoff.exportClaim":
        return path
    path = re.sub(r"^components\.(" + "|".join(COMPONENTS) + r")\.", "components.<name>.", path)
    return re.sub(r"^networkPolicy\.apiFrom\.(" + "|".join(COMPONENTS) + r")$", "networkPolicy.apiFrom.<name>", path)


def leaf_paths(value, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value and documented_name(prefix) not in OPAQUE:
        paths = []
        for key, inner in value.items():
            paths += leaf_paths(inner, f"{prefix}.{key}" if prefix else key)
        return paths
    return [prefix]


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, name: str, problems: list[str]) -> None:
        if problems:
            self.failed += 1
            print(f"FAIL {name}")
            for problem in problems:
                print(f"     {problem}")
        else:
            print(f"ok   {name}")


def lint_problems(values: dict) -> list[str]:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return problems + list(report.get("errors") or [])


def kubernetes_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        kind = (obj.get("apiVersion"), obj.get("kind"))
        if kind in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                problems.append(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}) {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{obj['kind']}/{obj['metadata']['name']}: no Kubernetes {version} schema ({error})")
    return problems


def deployment_problems(objs: list[dict], values: dict) -> list[str]:
    """What every Deployment must have, whatever the values."""
    problems = []
    deployments = by_kind(objs, "Deployment")
    merged_components = {c: (values.get("components", {}).get(c, {})) for c in COMPONENTS}
    enabled = [c for c in COMPONENTS if merged_components[c].get("enabled", True)]
    config_map = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config"))
    for component in enabled:
        name = f"{RELEASE}-{component}"
        d = deployments.get(name)
        if d is None:
            problems.append(f"no Deployment {name}")
            continue
        pod = d["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        where = f"Deployment {name}"
        port = 9600 + PORT_OFFSETS[component]
        if container["ports"][0]["containerPort"] != port:
            problems.append(f"{where}: port {container['ports'][0]['containerPort']}, the binary listens on {port}")
        if container["command"] != [f"/usr/local/bin/forfall-{component}"]:
            problems.append(f"{where}: command {container['command']}")
        for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]:
            got = container.get(probe, {}).get("httpGet", {})
            if got.get("path") != path or got.get("port") != "http":
                problems.append(f"{where}: {probe} is {got}, wanted {path} on port http")
        resources = container.get("resources", {})
        if not resources.get("requests", {}).get("cpu") or not resources.get("requests", {}).get("memory"):
            problems.append(f"{where}: no cpu and memory requests")
        if not resources.get("limits", {}).get("memory"):
            problems.append(f"{where}: no memory limit")
        sc = container.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: securityContext {sc}")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities not all dropped")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod securityContext {psc}")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service account token it never uses")
        checksum = d["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config")
        if not checksum or not re.fullmatch(r"[0-9a-f]{64}", checksum):
            problems.append(f"{where}: checksum/config annotation is {checksum!r}")
        spread = [c["topologyKey"] for c in pod.get("topologySpreadConstraints", [])]
        if spread != ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]:
            problems.append(f"{where}: topology spread over {spread}")
        for env in container.get("env", []):
            if SECRET_NAME.search(env["name"]) and "value" in env:
                problems.append(f"{where}: secret {env['name']} given as a plain value")
        mounted = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        if mounted.get("config") != "/etc/forfall" or mounted.get("tmp") != "/tmp":
            problems.append(f"{where}: mounts {mounted}")
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if env.get("FORFALL_CONFIG") != "/etc/forfall/forfall.json" or "forfall.json" not in config_map["data"]:
            problems.append(f"{where}: reads its configuration from {env.get('FORFALL_CONFIG')}")
        if env.get("FORFALL_ADMIN__BIND") != "0.0.0.0":
            problems.append(f"{where}: admin endpoint bound to {env.get('FORFALL_ADMIN__BIND')}, unreachable for probes")
    return problems


def companion_problems(objs: list[dict]) -> list[str]:
    """Each Deployment has its Service, PodDisruptionBudget and NetworkPolicy; autoscalers are exclusive."""
    problems = []
    deployments = by_kind(objs, "Deployment")
    for kind in ["Service", "PodDisruptionBudget", "NetworkPolicy"]:
        have = by_kind(objs, kind)
        for name, d in deployments.items():
            other = have.get(name)
            if other is None:
                problems.append(f"Deployment {name} has no {kind}")
                continue
            selector = other["spec"].get("selector") or other["spec"].get("podSelector")
            selector = selector.get("matchLabels", selector)
            labels = d["spec"]["template"]["metadata"]["labels"]
            if any(labels.get(k) != v for k, v in selector.items()):
                problems.append(f"{kind} {name} selects {selector}, not the Deployment's pods")
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    scaled = by_kind(objs, "ScaledObject")
    for name, d in deployments.items():
        if name in hpas and name in scaled:
            problems.append(f"Deployment {name} has both an HPA and a ScaledObject")
        if (name in hpas or name in scaled) and "replicas" in d["spec"]:
            problems.append(f"Deployment {name} is autoscaled and still sets replicas (each upgrade would reset them)")
    for name, s in scaled.items():
        (trigger,) = s["spec"]["triggers"]
        component = name.removeprefix(f"{RELEASE}-")
        if trigger["metadata"]["consumerGroup"] != f"forfall.{component}":
            problems.append(f"ScaledObject {name} watches group {trigger['metadata']['consumerGroup']}")
    return problems


def refusal_problems() -> list[str]:
    problems = []
    cases = [
        (
            "hpa and keda both on",
            {"components": {"matcher": {"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}}}},
            "components.matcher.autoscaling: hpa and keda are both enabled",
        ),
        (
            "a secret in config",
            {"config": {"dispatch": {"smtp": {"password": "hunter2"}}}},
            'config holds a secret ("password")',
        ),
        (
            "a secret in config, camel-cased provider key",
            {"config": {"portal": {"stripe": {"acme": {"webhook_secret": "whsec_x"}}}}},
            'config holds a secret ("webhook_secret")',
        ),
        ("a misspelt key", {"components": {"ingest": {"replica": 3}}}, "replica"),
        ("a wrong type", {"components": {"ingest": {"replicas": "three"}}}, "replicas"),
        ("an unknown component", {"components": {"billing": {"enabled": True}}}, "billing"),
        (
            "secretEnv naming an unknown component",
            {"secretEnv": [{"name": "FORFALL_X__TOKEN", "secretName": "s", "key": "k", "components": ["dispatcher"]}]},
            "dispatcher",
        ),
        ("secretEnv without a key", {"secretEnv": [{"name": "FORFALL_X__TOKEN", "secretName": "s"}]}, "key"),
    ]
    for what, values, wanted in cases:
        said = refused(values)
        if not said:
            problems.append(f"{what}: rendered without complaint")
        elif wanted not in said:
            problems.append(f"{what}: refused, but the error does not say {wanted!r}: {said}")
    return problems


def checksum_problems() -> list[str]:
    """A change to the configuration or the policy rolls the pods; other values do not."""
    def checksums(values: dict) -> dict[str, str]:
        deployments = by_kind(objects(render(values)), "Deployment")
        return {n: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"] for n, d in deployments.items()}

    problems = []
    base = checksums({})
    config = checksums({"config": {"kafka": {"brokers": "elsewhere:9092"}}})
    policy = checksums({"policy": 'version = "x"\n'})
    replicas = checksums({"components": {"ingest": {"replicas": 5}}})
    for name in base:
        if config[name] == base[name]:
            problems.append(f"{name}: configuration changed, checksum did not")
        if policy[name] == base[name]:
            problems.append(f"{name}: policy changed, checksum did not")
        if replicas[name] != base[name]:
            problems.append(f"{name}: replicas changed, and so did the configuration checksum")
    return problems


def secret_env_problems(objs: list[dict], values: dict) -> list[str]:
    """Each secret reaches exactly the components it names, from the Secret it names."""
    problems = []
    deployments = by_kind(objs, "Deployment")
    for entry in values.get("secretEnv", []):
        for component in COMPONENTS:
            d = deployments.get(f"{RELEASE}-{component}")
            if d is None:
                continue
            env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            wanted = not entry.get("components") or component in entry["components"]
            got = env.get(entry["name"])
            if wanted and got is None:
                problems.append(f"{component} lacks {entry['name']}")
            elif wanted and got["valueFrom"]["secretKeyRef"] != {"name": entry["secretName"], "key": entry["key"]}:
                problems.append(f"{component}: {entry['name']} from {got['valueFrom']}")
            elif not wanted and got is not None:
                problems.append(f"{component} gets {entry['name']}, which is not meant for it")
    return problems


def monitoring_problems(objs: list[dict]) -> list[str]:
    """The PrometheusRule carries every rule of deploy/prometheus/rules, the dashboards ConfigMap
    every dashboard of deploy/grafana, and the ServiceMonitor scrapes every component's Service."""
    problems = []
    rules_dir = ROOT / "deploy" / "prometheus" / "rules"
    wanted = sorted(
        r.get("alert") or r.get("record")
        for f in sorted(rules_dir.glob("*.rules.yml"))
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
    )
    (rule,) = by_kind(objs, "PrometheusRule").values()
    got = sorted(r.get("alert") or r.get("record") for g in rule["spec"]["groups"] for r in g["rules"])
    if got != wanted:
        problems.append(f"PrometheusRule has {got}, the rule files {wanted}")
    (dashboards,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboards")]
    for f in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        if json.loads(dashboards["data"].get(f.name, "null")) != json.loads(f.read_text()):
            problems.append(f"dashboards ConfigMap lacks {f.name} or changed it")
    (monitor,) = by_kind(objs, "ServiceMonitor").values()
    services = by_kind(objs, "Service")
    for name, service in services.items():
        if any(service["metadata"]["labels"].get(k) != v for k, v in monitor["spec"]["selector"]["matchLabels"].items()):
            problems.append(f"ServiceMonitor does not select Service {name}")
        if [p["name"] for p in service["spec"]["ports"]] != [monitor["spec"]["endpoints"][0]["port"]]:
            problems.append(f"Service {name} has no port {monitor['spec']['endpoints'][0]['port']}")
    return problems


def readme_problems() -> list[str]:
    """Every value is in the README's values table, and the table names no value that is gone."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"(?m)^\| `([^`]+)` \|", readme))
    paths = {documented_name(p) for p in leaf_paths(defaults)}
    problems = [f"values.yaml has {p}, the README's table does not" for p in sorted(paths - documented)]
    problems += [f"the README's table has {p}, values.yaml does not" for p in sorted(documented - paths)]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="rewrite the golden files")
    parser.add_argument("--render", nargs=2, metavar=("VALUES", "OUT"), help="write one rendering and exit")
    parser.add_argument("--config-files", nargs=2, metavar=("VALUES", "DIR"),
                        help="write the files of the configuration ConfigMap into DIR and exit")
    args = parser.parse_args()
    if args.render:
        Path(args.render[1]).write_text(as_text(render(values_of(args.render[0]))))
        return 0
    if args.config_files:
        objs = objects(render(values_of(args.config_files[0])))
        (config_map,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config")]
        for name, text in config_map["data"].items():
            (Path(args.config_files[1]) / name).write_text(text)
        return 0

    checks = Checks()
    for name in ["default", "production"]:
        values = values_of(name)
        rendered = render(values)
        objs = objects(rendered)
        checks.check(f"{name}: helm lint --strict", lint_problems(values))
        with helm.Chart.load(str(CHART)) as chart:
            try:
                chart.validate_schema(values)
                schema = []
            except helm.HelmError as error:
                schema = [str(error)]
        checks.check(f"{name}: values.schema.json accepts the values", schema)
        checks.check(f"{name}: every object valid for Kubernetes {' and '.join(KUBE_VERSIONS)} (strict)", kubernetes_problems(objs))
        checks.check(f"{name}: every Deployment has its probes, resources, security context, spread and checksum", deployment_problems(objs, values))
        checks.check(f"{name}: every Deployment has its Service, PDB and NetworkPolicy; autoscalers exclusive", companion_problems(objs))
        checks.check(f"{name}: secrets reach only the components named, from existing Secrets", secret_env_problems(objs, values))
        golden = GOLDEN / f"{name}.yaml"
        text = as_text(rendered)
        if args.update:
            golden.write_text(text)
        diff = list(difflib.unified_diff(
            golden.read_text().splitlines() if golden.exists() else [], text.splitlines(),
            f"helm/golden/{name}.yaml", "rendered", lineterm="", n=1))
        checks.check(f"{name}: rendering equals helm/golden/{name}.yaml (`--update` after a deliberate change)", diff[:60])
    checks.check("production: PrometheusRule, dashboards and ServiceMonitor carry deploy/ and every Service",
                 monitoring_problems(objects(render(values_of("production")))))
    checks.check("refused: conflicting, misspelt, mistyped and secret values, each with its reason", refusal_problems())
    checks.check("checksum/config follows the configuration and the policy, nothing else", checksum_problems())
    checks.check("the chart README's values table lists every value", readme_problems())
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
