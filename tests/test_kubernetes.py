"""The Kubernetes manifests (examples/kubernetes), checked offline: every overlay renders with `kubectl
kustomize`, every resource it renders passes kubernetes-validate (strict) for the newest Kubernetes version it
knows, every Baton container's command line parses with Baton's own parser, a node's grace period covers its
drain, its probes and GPUs match its flags, and the development overlay runs what `baton up` runs for the same
shape (the same flags and values, but for what only Kubernetes needs), so manifests and CLI cannot drift."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from baton.cluster.cli import build_parser, up_spec
from baton.cluster.launch import up_commands
from baton.common.grpc_server import SHUTDOWN_GRACE_S

KUBECTL = shutil.which("kubectl")
OVERLAYS = Path(__file__).resolve().parents[1] / "examples" / "kubernetes" / "overlays"
# What a pod needs and `baton up` decides for itself: names (the pod's: a node's id, a router's record in etcd),
# the address it binds (every interface of the pod) and the one others dial (the pod's), fixed ports (a
# Service and the probes name them) and the metrics ports Prometheus scrapes.
KUBERNETES_ONLY = {"node_id", "router_id", "host", "advertise_host", "port", "metrics_port"}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (`make test` installs it)")


def render(folder: Path) -> list[dict]:
    done = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{folder}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every overlay, and overlays with each optional component as an operator adds it (closed: the secret and
    API keys; autoscale: replicas from the planner's advice)."""
    out = {overlay.name: render(overlay) for overlay in sorted(p for p in OVERLAYS.iterdir() if p.is_dir())}
    for overlay, component in (("one-machine-8gpu", "closed"), ("dev-cpu", "autoscale")):
        folder = tmp_path_factory.mktemp(component)
        up = os.path.relpath(OVERLAYS.parent, folder)  # kustomize takes relative paths only
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"{up}/overlays/{overlay}"], "components": [f"{up}/components/{component}"]}))
        out[f"{overlay}+{component}"] = render(folder)
    return out


def workloads(docs: list[dict]):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]["spec"]


def baton_args(container: dict) -> list[str]:
    """The container's arguments to `baton`, with the downward API's $(VAR)s as a pod would see them."""
    values = {"POD_NAME": "baton-prefill-0", "POD_IP": "10.0.0.7"}
    return [re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), a) for a in container.get("args", [])]


def parse(args: list[str]) -> argparse.Namespace:
    """Baton's own parser; a flag it does not know fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"baton {' '.join(args)}: {err.getvalue()}")


def baton_containers(docs: list[dict]):
    for d, pod in workloads(docs):
        for c in pod["containers"]:
            if c.get("command") == ["baton"]:
                yield d, pod, c, parse(baton_args(c))


def test_every_overlay_renders_and_validates(rendered):
    assert {"dev-cpu", "one-machine-8gpu", "two-machines-8gpu"} <= set(rendered)
    version = kubernetes_validate.latest_version()
    for name, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget"} <= kinds, (name, kinds)
        for d in docs:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {d['kind']} {d['metadata']['name']}: {e.message} at {list(e.path)}")


def test_containers_parse_and_pods_fit_their_flags(rendered):
    for name, docs in rendered.items():
        roles = set()
        for d, pod, c, args in baton_containers(docs):
            where = f"{name}: {d['metadata']['name']}"
            if args.command in ("node", "router"):  # a probe on the port it serves; a grace covering its drain
                assert c["readinessProbe"]["grpc"]["port"] == args.port, where
                drain = getattr(args, "drain_timeout", 0.0) or 0.0
                assert pod["terminationGracePeriodSeconds"] >= drain + SHUTDOWN_GRACE_S, where
            if args.command == "node":
                roles.add(args.role)
                gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                assert gpus == (args.tp if args.device == "cuda" else 0), where
                # A rolling update surges where a pod can start beside the old one (not on taken GPUs).
                surge = d["spec"]["strategy"]["rollingUpdate"]
                assert surge == ({"maxSurge": 0, "maxUnavailable": 1} if args.device == "cuda" else
                                 {"maxSurge": 1, "maxUnavailable": 0}), where
        assert roles == {"prefill", "decode"}, (name, roles)
    closed = [args for _, _, _, args in baton_containers(rendered["one-machine-8gpu+closed"])]
    assert all(a.cluster_secret_file for a in closed if a.command in ("node", "router"))
    assert all(a.auth for a in closed if a.command == "router")


def test_the_development_overlay_runs_what_baton_up_runs(rendered):
    """`baton up` for the overlay's shape (its replicas, host, ports, threads and etcd), against what the
    overlay's pods run: the same flags with the same values, but for KUBERNETES_ONLY."""
    docs = rendered["dev-cpu"]
    pods = {}
    for d, _, _, args in baton_containers(docs):
        key = args.role if args.command == "node" else args.command
        pods[key] = (d.get("spec", {}).get("replicas", 1), args)
    (_, router), (prefill, p), (decode, dn) = pods["router"], pods["prefill"], pods["decode"]
    up = parse(["up", "--prefill", str(prefill), "--decode", str(decode), "--threads", str(p.threads), "--port",
                str(router.port), "--http-port", str(router.http_port), "--etcd", p.etcd])
    spec, made = up_spec(up)
    assert not made
    commands = up_commands(spec, p.etcd, p.cluster, router.port, p.threads)
    assert sorted(commands) == sorted([*(f"prefill-{i}" for i in range(prefill)),
                                       *(f"decode-{i}" for i in range(decode)), "router"])

    def same(ours: argparse.Namespace, theirs: list[str]) -> dict:
        want = {k: v for k, v in vars(parse(theirs)).items() if k not in KUBERNETES_ONLY | {"run"}}
        have = {k: v for k, v in vars(ours).items() if k not in KUBERNETES_ONLY | {"run"}}
        return {k: (have.get(k), want.get(k)) for k in want.keys() | have.keys() if have.get(k) != want.get(k)}

    assert same(p, commands["prefill-0"]) == {}
    assert same(dn, commands["decode-0"]) == {}
    assert same(router, commands["router"]) == {}


def test_the_autoscalers_follow_the_metric_the_planner_exports(rendered):
    """components/autoscale: one HPA per role's Deployment, on the planner's gauge for that role, so that the
    desired replicas are the nodes it advises (target: an average value of 1)."""
    from baton.cluster.planner_run import PlannerMetrics

    exported = {m.name for m in PlannerMetrics().registry.collect()}
    docs = rendered["dev-cpu+autoscale"]
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    roles = set()
    for hpa in hpas:
        target = sets[hpa["spec"]["scaleTargetRef"]["name"]]
        [metric] = hpa["spec"]["metrics"]
        role = metric["external"]["metric"]["selector"]["matchLabels"]["role"]
        node = parse(baton_args(target["spec"]["template"]["spec"]["containers"][0]))
        assert node.role == role and metric["external"]["metric"]["name"] in exported
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
        roles.add(role)
    assert roles == {"prefill", "decode"}
