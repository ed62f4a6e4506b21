"""Deployment files (compose, Dockerfile, Prometheus, Kustomize) parse and agree with the code.

No container engine or cluster here: pure file parsing and cross-checks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from streams.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "infra" / "prometheus" / "prometheus.yml"
K8S = ROOT / "infra" / "k8s"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "dev", K8S / "overlays" / "prod"]
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
    assert svc.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    image = svc.get("image")
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
    for name in ("worker", "bridge"):
        svc = services[name]
        assert svc["build"]["target"] == "cpu"
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
    secret = _base_objects("Secret")["inferstream-secrets"]["stringData"]
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
    assert dev["spec"]["replicas"] == 1
    prod = patch("prod", "worker-gpu-patch.yaml")
    (worker,) = prod["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith("-gpu")
    assert prod["spec"]["replicas"] > 1


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_stages_and_entrypoint():
    text = DOCKERFILE.read_text()
    stages = dict((m.group(2).lower(), m.group(1)) for m in
                  re.finditer(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M | re.I))
    assert {"builder", "cpu", "gpu"} <= set(stages)
    for image in stages.values():
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    assert stages["cpu"].startswith("python:3.11")
    assert stages["gpu"].startswith("nvidia/cuda:")
    assert "python -m models.build" in text and "torch==2.13.0" in text
    assert '".[cpu]"' in text and '".[gpu]"' in text
    assert text.count("--from=builder") == 2
    assert re.search(r'^ENTRYPOINT \["inferstream"\]', text, re.M)
    assert re.search(r'^CMD \["worker"\]', text, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "models/repository" in ignored
