"""Deployment files (compose, Dockerfile, Prometheus, Kustomize) parse and agree with the code
(the CI workflow: test_workflow.py).

No container engine or cluster here: file parsing and cross-checks, and the overlays rendered
with the venv's `kubectl kustomize` and checked against the Kubernetes schemas
(kubernetes-validate). Those tools come with the `dev` extra; where one is missing the tests fail
rather than skip.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from support.dockerfile import DOCKERFILE, base_images

from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "infra" / "prometheus" / "prometheus.yml"
K8S = ROOT / "infra" / "k8s"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "dev", K8S / "overlays" / "staging", K8S / "overlays" / "prod"]
ENDPOINT_VARS = ["INFERSTREAM_KAFKA_BOOTSTRAP", "INFERSTREAM_S3_ENDPOINT", "INFERSTREAM_POSTGRES_DSN",
                 "INFERSTREAM_REDIS_URL"]
DEFAULT_BRIDGE_PORT = Settings.model_fields["bridge_port"].default


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict:
    return _compose()["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def _k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") != "Kustomization"]
    return docs


def _base_objects(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for p, d in _k8s_docs()
            if d.get("kind") == kind and p.parent == K8S / "base"}


def _containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _container_port(spec: str | int) -> int:
    """Container side of a compose port: "8000", "8000:8000", "127.0.0.1:8000:8000/tcp"."""
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1])


def _listen_ports(name: str, service: dict) -> set[int]:
    ports = {_container_port(p) for p in service.get("ports", []) + service.get("expose", [])}
    env = _env(service)
    if service.get("command", [None])[0] == "bridge":
        ports.add(int(env.get("INFERSTREAM_BRIDGE_PORT", DEFAULT_BRIDGE_PORT)))
    if int(env.get("INFERSTREAM_METRICS_PORT", 0)) > 0:
        ports.add(int(env["INFERSTREAM_METRICS_PORT"]))
    return ports


def _all_inferstream_vars() -> dict[str, str]:
    """Every INFERSTREAM_* name set anywhere in the deployment files -> where."""
    found: dict[str, str] = {}
    for name, svc in _services().items():
        found.update({k: f"compose:{name}" for k in _env(svc) if k.startswith("INFERSTREAM_")})
    for path, doc in _k8s_docs():
        keys = list((doc.get("data") or {})) + list((doc.get("stringData") or {}))
        if doc.get("kind") == "Deployment":
            for c in _containers(doc):
                keys += [e["name"] for e in c.get("env", [])]
        found.update({k: str(path.relative_to(ROOT)) for k in keys if k.startswith("INFERSTREAM_")})
    for match in re.finditer(r"\b(INFERSTREAM_[A-Z0-9_]+)=", DOCKERFILE.read_text()):
        found[match.group(1)] = "Dockerfile"
    return found


# -- parsing -----------------------------------------------------------------------------------


def test_yaml_files_parse():
    assert isinstance(_compose()["services"], dict)
    assert isinstance(yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"], list)
    docs = _k8s_docs()
    assert docs and all(isinstance(d, dict) for _, d in docs)


# -- compose -----------------------------------------------------------------------------------


def test_compose_has_the_stack():
    expected = {"kafka", "postgres", "redis", "minio", "triton", "prometheus", "jaeger", "grafana", "worker", "bridge"}
    assert expected <= set(_services())


@pytest.mark.parametrize("name", sorted(yaml.safe_load(COMPOSE.read_text())["services"]) if COMPOSE.exists() else [])
def test_compose_service_healthcheck_and_pinned_image(name):
    svc = _services()[name]
    image = svc.get("image")
    if svc.get("restart") == "no":  # a one-shot: it exits, so no health to check
        assert svc["healthcheck"] == {"disable": True}, name
    elif image != _services()["worker"]["image"]:  # the inferstream image has a HEALTHCHECK
        assert svc.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    assert image or svc.get("build"), f"{name}: neither image nor build"
    if image and not svc.get("build"):
        last = image.rsplit("/", 1)[-1]
        assert "@sha256:" in image or ":" in last, f"{name}: untagged image {image}"
        assert not image.endswith(":latest"), f"{name}: {image} is not pinned"


def test_compose_avoids_local_stack_stand_ins():
    text = COMPOSE.read_text().lower()
    assert "tansu" not in text and "seaweed" not in text


def test_compose_worker_and_bridge():
    services = _services()
    assert services["worker"]["build"]["target"] == "cpu"
    for name in ("worker", "bridge"):
        svc = services[name]
        assert svc["image"] == services["worker"]["image"]
        env = _env(svc)
        missing = [v for v in ENDPOINT_VARS if not env.get(v)]
        assert not missing, f"{name}: endpoint vars not set: {missing}"
        host, port = env["INFERSTREAM_KAFKA_BOOTSTRAP"].rsplit(":", 1)
        assert host in services and int(port) in _listen_ports(host, services[host])
        s3_host, s3_port = env["INFERSTREAM_S3_ENDPOINT"].rsplit(":", 1)
        assert s3_host in services and int(s3_port) in _listen_ports(s3_host, services[s3_host])
        for var in ("INFERSTREAM_POSTGRES_DSN", "INFERSTREAM_REDIS_URL"):
            netloc = env[var].split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
            host, port = netloc.rsplit(":", 1)
            assert host in services and int(port) in _listen_ports(host, services[host]), var
        assert set(svc["depends_on"]) >= {"kafka", "postgres", "redis", "minio"}
        assert int(env.get("INFERSTREAM_KAFKA_FETCH_MAX_WAIT_MS", 0)) >= 100
    worker = services["worker"]
    assert "container_name" not in worker, "worker must scale with --scale worker=N"
    assert not worker.get("ports"), "a fixed host port would stop --scale worker=N"
    assert int(_env(worker)["INFERSTREAM_METRICS_PORT"]) > 0
    assert _env(services["bridge"])["INFERSTREAM_BRIDGE_HOST"] == "0.0.0.0"


def test_bridge_ports_agree():
    bridge = _services()["bridge"]
    port = int(_env(bridge).get("INFERSTREAM_BRIDGE_PORT", DEFAULT_BRIDGE_PORT))
    assert port in {_container_port(p) for p in bridge["ports"]}

    config = _base_objects("ConfigMap")["inferstream-config"]["data"]
    k8s_port = int(config.get("INFERSTREAM_BRIDGE_PORT", DEFAULT_BRIDGE_PORT))
    assert config.get("INFERSTREAM_BRIDGE_HOST") == "0.0.0.0"
    (container,) = _containers(_base_objects("Deployment")["inferstream-bridge"])
    assert k8s_port in {p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": k8s_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": k8s_port}
    service = _base_objects("Service")["inferstream-bridge"]
    assert k8s_port in {p["targetPort"] for p in service["spec"]["ports"]}


def test_worker_metrics_port_agrees():
    config = _base_objects("ConfigMap")["inferstream-config"]["data"]
    port = int(config["INFERSTREAM_METRICS_PORT"])
    assert port > 0
    (container,) = _containers(_base_objects("Deployment")["inferstream-worker"])
    assert port in {p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        spec = container[probe]
        assert spec.get("exec") or (spec.get("tcpSocket") or spec.get("httpGet"))["port"] == port
    service = _base_objects("Service")["inferstream-worker-metrics"]
    assert port in {p["targetPort"] for p in service["spec"]["ports"]}


# -- settings ----------------------------------------------------------------------------------


def test_every_inferstream_var_is_a_setting():
    found = _all_inferstream_vars()
    assert len(found) > 5
    unknown = {k: where for k, where in found.items()
               if k.removeprefix("INFERSTREAM_").lower() not in Settings.model_fields}
    assert not unknown, f"not fields of streams.settings.Settings: {unknown}"


# -- prometheus --------------------------------------------------------------------------------


def test_prometheus_targets_are_compose_services():
    services = _services()
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets: list[tuple[str, int]] = []
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets += [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in static["targets"]]
        for dns in job.get("dns_sd_configs", []):
            targets += [(n, int(dns["port"])) for n in dns["names"]]
    assert targets
    for host, port in targets:
        assert host in services, f"scrape target {host} is no compose service"
        assert port in _listen_ports(host, services[host]), f"{host} does not listen on {port}"
    hosts = {h for h, _ in targets}
    assert {"bridge", "worker"} <= hosts
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "infra/prometheus/prometheus.yml" in mounts


# -- kustomize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_exist(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    entries = list(kustomization.get("resources", []))
    entries += [p["path"] if isinstance(p, dict) else p for p in kustomization.get("patches", [])
                if not isinstance(p, dict) or "path" in p]
    assert entries
    for entry in entries:
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory}: {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists()
    if directory != K8S / "base":
        assert "../../base" in kustomization["resources"]
        # each patch names an object the base defines
        base = {(d["kind"], d["metadata"]["name"]) for p, d in _k8s_docs() if p.parent == K8S / "base"}
        for p in kustomization.get("patches", []):
            if "path" not in p:  # an inline JSON patch names its target
                assert (p["target"]["kind"], p["target"]["name"]) in base
                continue
            patch = yaml.safe_load((directory / p["path"]).read_text())
            assert (patch["kind"], patch["metadata"]["name"]) in base


def test_k8s_base_objects():
    deployments = _base_objects("Deployment")
    assert set(deployments) == {"inferstream-worker", "inferstream-bridge"}
    for d in deployments.values():
        for c in _containers(d):
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert c["livenessProbe"] and c["readinessProbe"]
            refs = {next(iter(e.values()))["name"] for e in c["envFrom"]}
            assert refs == {"inferstream-config", "inferstream-secrets"}
    assert not _base_objects("Secret"), "no Secret is applied: the ExternalSecret makes it"
    external = _base_objects("ExternalSecret")["inferstream-secrets"]["spec"]
    secret = {entry["secretKey"] for entry in external["data"]}
    assert external["target"]["name"] == "inferstream-secrets"
    assert {"INFERSTREAM_S3_ACCESS_KEY", "INFERSTREAM_S3_SECRET_KEY", "INFERSTREAM_POSTGRES_DSN",
            "INFERSTREAM_JWT_HS_SECRET", "INFERSTREAM_API_KEY_PEPPER"} <= set(secret)
    hpa = _base_objects("HorizontalPodAutoscaler")["inferstream-bridge"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "inferstream-bridge"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    scaled = _base_objects("ScaledObject")["inferstream-worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "inferstream-worker"
    trigger = scaled["spec"]["triggers"][0]
    settings = Settings()
    if trigger["type"] == "kafka":
        assert trigger["metadata"]["consumerGroup"] == settings.app_id
        assert trigger["metadata"]["topic"] == f"{settings.topic_prefix}.requests"
    else:
        assert trigger["type"] == "prometheus" and "inferstream_consumer_lag" in trigger["metadata"]["query"]


def test_k8s_overlays():
    def patch(overlay, name):
        return yaml.safe_load((K8S / "overlays" / overlay / name).read_text())

    dev = patch("dev", "worker-patch.yaml")
    (worker,) = dev["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in str(worker["resources"])
    prod = patch("prod", "worker-gpu-patch.yaml")
    (worker,) = prod["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith("-gpu")


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_stages_and_entrypoint():
    text = DOCKERFILE.read_text()
    stages = base_images()
    assert {"builder", "cpu", "gpu"} <= set(stages)
    for image in stages.values():
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    assert stages["cpu"].startswith("python:3.11")
    assert stages["gpu"].startswith("nvidia/cuda:")
    assert "python -m models.build" in text and "torch==2.13.0" in text
    # The builder makes the wheel; each runtime installs it with its onnxruntime extra.
    assert "pip wheel --no-deps --wheel-dir /wheels ." in text
    assert '/wheels/inferstream-*.whl)[cpu,triton]"' in text and '/wheels/inferstream-*.whl)[gpu,triton]"' in text
    assert text.count("--mount=type=bind,from=builder,source=/wheels,target=/wheels") == 2
    assert text.count("--from=builder --chown=10001:10001 /src/models/repository") == 2
    assert re.search(r'^ENTRYPOINT \["inferstream"\]', text, re.M)
    assert re.search(r'^CMD \["worker"\]', text, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "models/repository" in ignored


# -- tools (the `dev` extra installs them next to the interpreter) ------------------------------

BIN = Path(sys.executable).parent


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} is not in {BIN}: install the dev extra (pip install -e '.[dev]')")
    return path


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"cannot import {name} ({exc}): install the dev extra (pip install -e '.[dev]')")


# -- rendered overlays: kubectl kustomize -------------------------------------------------------

OVERLAYS = ["dev", "staging", "prod"]
NAMESPACES = {overlay: f"inferstream-{overlay}" for overlay in OVERLAYS}
# Kinds without a namespace; every other rendered object must carry metadata.namespace.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "IngressClass", "RuntimeClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration", "APIService"}
GPU = "nvidia.com/gpu"


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize infra/k8s/overlays/<overlay>` as parsed documents."""
    result = subprocess.run([str(_tool("kubectl")), "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kustomize {overlay} failed: {result.stderr}"
    assert not result.stderr.strip(), f"kustomize {overlay} warned: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _rendered(overlay: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _render(overlay) if d["kind"] == kind}


_QUANTITY_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                      "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "2", "512Mi") as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in {"", *_QUANTITY_SUFFIXES}, f"not a quantity: {value!r}"
    return float(match.group(1)) * _QUANTITY_SUFFIXES.get(match.group(2), 1)


def test_kubectl_is_the_pinned_one():
    result = subprocess.run([str(_tool("kubectl")), "version", "--client"], capture_output=True, text=True,
                            timeout=60, check=True)
    assert "Kustomize Version" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_app(overlay):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in _render(overlay))
    assert kinds == sorted([
        ("Namespace", NAMESPACES[overlay]), ("ServiceAccount", "inferstream"), ("ConfigMap", "inferstream-config"),
        ("ExternalSecret", "inferstream-secrets"),
        ("Service", "inferstream-bridge"), ("Service", "inferstream-worker-metrics"),
        ("Deployment", "inferstream-bridge"), ("Deployment", "inferstream-worker"),
        ("Ingress", "inferstream-bridge"),
        ("PodDisruptionBudget", "inferstream-bridge"), ("PodDisruptionBudget", "inferstream-worker"),
        ("NetworkPolicy", "default-deny"), ("NetworkPolicy", "inferstream-bridge"),
        ("NetworkPolicy", "inferstream-worker"),
        ("HorizontalPodAutoscaler", "inferstream-bridge"), ("ScaledObject", "inferstream-worker"),
    ])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_are_namespaced(overlay):
    namespace = NAMESPACES[overlay]
    assert namespace in _rendered(overlay, "Namespace")
    for doc in _render(overlay):
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], f"{where} is cluster-scoped"
        else:
            assert doc["metadata"].get("namespace") == namespace, f"{where}: namespace not set"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_deployments_have_probes_and_resources(overlay):
    deployments = _rendered(overlay, "Deployment")
    assert deployments
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items(), name
        for c in _containers(deployment):
            where = f"{overlay}: {name}/{c['name']}"
            ports = {p["containerPort"] for p in c.get("ports", [])} | {p["name"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                assert c.get(probe), f"{where}: no {probe}"
                action = c[probe].get("httpGet") or c[probe].get("tcpSocket") or c[probe].get("grpc")
                assert c[probe].get("exec") or action["port"] in ports, f"{where}: {probe} on an unexposed port"
            resources = c.get("resources") or {}
            for key in ("cpu", "memory"):
                request, limit = resources.get("requests", {}).get(key), resources.get("limits", {}).get(key)
                assert request is not None and limit is not None, f"{where}: {key} request and limit"
                assert _quantity(request) <= _quantity(limit), f"{where}: {key} request {request} > limit {limit}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_references_exist(overlay):
    """ConfigMaps and Secrets that the pods name, and the pods that Services select, are rendered."""
    config_maps, secrets = set(_rendered(overlay, "ConfigMap")), set(_rendered(overlay, "Secret"))
    secrets |= {e["spec"]["target"]["name"] for e in _rendered(overlay, "ExternalSecret").values()}
    deployments = _rendered(overlay, "Deployment")
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        refs: list[tuple[str, str]] = []
        for c in pod["containers"] + pod.get("initContainers", []):
            for source in c.get("envFrom", []):
                refs += [(kind, source[key]["name"]) for key, kind in
                         (("configMapRef", "ConfigMap"), ("secretRef", "Secret")) if key in source]
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                refs += [(kind, ref[key]["name"]) for key, kind in
                         (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")) if key in ref]
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                refs.append(("ConfigMap", volume["configMap"]["name"]))
            if "secret" in volume:
                refs.append(("Secret", volume["secret"]["secretName"]))
        assert refs, f"{overlay}: {name} reads no configuration"
        for kind, ref in refs:
            assert ref in (config_maps if kind == "ConfigMap" else secrets), f"{overlay}: {name} names {kind} {ref}"
    for name, service in _rendered(overlay, "Service").items():
        selector = service["spec"]["selector"]
        targets = [d for d in deployments.values()
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"{overlay}: Service {name} selects {len(targets)} Deployments"
        ports = {p["containerPort"] for c in _containers(targets[0]) for p in c.get("ports", [])}
        ports |= {p["name"] for c in _containers(targets[0]) for p in c.get("ports", []) if "name" in p}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, f"{overlay}: Service {name} port {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_autoscalers_target_the_deployments(overlay):
    deployments = _rendered(overlay, "Deployment")
    (hpa,) = _rendered(overlay, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "inferstream-bridge"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (scaled,) = _rendered(overlay, "ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == "inferstream-worker"
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    assert {hpa["spec"]["scaleTargetRef"]["name"], target["name"]} <= set(deployments)
    assert 0 <= scaled["spec"].get("minReplicaCount", 0) <= scaled["spec"]["maxReplicaCount"]
    # More workers than request partitions would sit idle.
    assert scaled["spec"]["maxReplicaCount"] <= Settings().request_partitions
    assert scaled["spec"]["triggers"]
    # The autoscalers own the replica counts: a Deployment that set one would reset it on every apply.
    for name in (hpa["spec"]["scaleTargetRef"]["name"], target["name"]):
        assert "replicas" not in deployments[name]["spec"], f"{overlay}: {name} sets replicas"


def test_prod_worker_requests_a_gpu_and_dev_none():
    (prod,) = _containers(_rendered("prod", "Deployment")["inferstream-worker"])
    resources = prod["resources"]
    # Extended resources cannot be overcommitted: a request, when given, must equal the limit.
    assert int(resources["limits"][GPU]) >= 1
    assert int(resources["requests"].get(GPU, resources["limits"][GPU])) == int(resources["limits"][GPU])
    assert prod["image"].endswith("-gpu")
    tolerations = _rendered("prod", "Deployment")["inferstream-worker"]["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == GPU for t in tolerations)
    for overlay in OVERLAYS:
        for name, deployment in _rendered(overlay, "Deployment").items():
            if (overlay, name) != ("prod", "inferstream-worker"):
                for c in _containers(deployment):
                    assert GPU not in str(c.get("resources")), f"{overlay}: {name} asks for a GPU"
                    assert c["image"].endswith("-cpu"), f"{overlay}: {name} runs {c['image']}"


# -- rendered overlays: Kubernetes schemas (kubernetes-validate, offline) ---------------------

# Custom resources are not in the Kubernetes schemas that kubernetes-validate ships, so they are
# left out of the schema check on purpose; each has its own structural checks above.
NOT_IN_KUBERNETES_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"):
        "KEDA CRD: no schema in kubernetes-validate; see test_rendered_autoscalers_target_the_deployments",
    ("external-secrets.io/v1", "ExternalSecret"):
        "External Secrets CRD: no schema in kubernetes-validate; see test_k8s_base_objects",
}


def _kubernetes_versions() -> list[str]:
    """The oldest and the newest Kubernetes version whose schemas kubernetes-validate ships."""
    versions = _module("kubernetes_validate.utils").all_versions()  # sorted by version
    return list(dict.fromkeys([versions[0], versions[-1]]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_match_kubernetes_schemas(overlay):
    kv = _module("kubernetes_validate")
    checked, left_out = [], []
    for doc in _render(overlay):
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in NOT_IN_KUBERNETES_SCHEMAS:
            left_out.append(what)
            continue
        for version in _kubernetes_versions():
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{overlay}: {what} against Kubernetes {version}: {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                pytest.fail(f"{overlay}: {exc.message}; a custom resource goes in NOT_IN_KUBERNETES_SCHEMAS")
        checked.append(what)
    assert len(checked) == 14, checked
    assert sorted(left_out) == ["ExternalSecret/inferstream-secrets", "ScaledObject/inferstream-worker"], left_out


def test_schema_check_rejects_a_broken_deployment():
    """The check above is no formality: strict schemas refuse unknown fields and wrong types."""
    kv = _module("kubernetes_validate")
    version = _kubernetes_versions()[-1]
    good = _rendered("prod", "Deployment")["inferstream-worker"]
    kv.validate(good, version, strict=True)
    typo = copy.deepcopy(good)
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"tcpSocket": {"port": 9100}}
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (typo, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, version, strict=True)
