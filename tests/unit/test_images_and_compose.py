"""The images (Dockerfile), the constraints file and the compose stack, checked by parsing and
by schema: no container engine runs here. The compose file against the Compose specification's
schema (check-jsonschema's vendored copy, offline)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from support.dockerfile import DOCKERFILE, stages

from models.build import MODELS
from streams.telemetry import metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CONSTRAINTS = ROOT / "constraints.txt"
ENV_EXAMPLE = ROOT / ".env.example"
RUNTIME_STAGES = {"cpu": "cpu,triton", "gpu": "gpu,triton"}
OCI_LABELS = {"title", "source", "revision", "version", "licenses"}
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
CREDENTIAL = re.compile(r"PASSWORD|SECRET|PEPPER|ACCESS_KEY|ADMIN_USER", re.I)


def _instructions(stage: str) -> list[str]:
    """The stage's instructions, continuation lines joined and comments left out."""
    lines = [line for line in stages()[stage].splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def _stage_env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in _instructions(stage):
        if instruction.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", instruction))
    return env


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one value with the given variables (raises where compose would)."""
    def replace(match: re.Match) -> str:
        name, operator, argument = match.groups()
        current = env.get(name)
        unset = current is None or (operator or "").startswith(":") and current == ""
        if operator and operator.endswith("?") and unset:
            raise ValueError(f"{name}: {argument}")
        if operator and operator.endswith("-") and unset:
            return argument
        return current or ""
    return INTERPOLATION.sub(replace, value)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, dict]:
    return _compose()["services"]


def _env_example() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _required_variables() -> set[str]:
    return {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text()) if (m.group(2) or "").endswith("?")}


# -- Dockerfile ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "extras"), RUNTIME_STAGES.items())
def test_runtime_images_install_every_backend_with_the_constraints(stage, extras):
    installs = [i for i in _instructions(stage) if "pip install" in i]
    assert len(installs) == 1, installs
    assert f'/wheels/inferstream-*.whl)[{extras}]"' in installs[0]
    assert "pip install -c /tmp/constraints.txt " in installs[0]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("tritonclient") for r in pyproject["triton"])


def test_every_pip_install_takes_the_constraints_and_a_cache_mount():
    installs = [i for stage in stages() for i in _instructions(stage) if "pip install" in i]
    assert len(installs) == 4
    for instruction in installs:
        assert re.search(r"pip install -c \S*constraints\.txt ", instruction), instruction
        assert "--mount=type=cache,target=/root/.cache/pip" in instruction, instruction
    assert "PIP_NO_CACHE_DIR" not in DOCKERFILE.read_text()  # the cache mount is never in a layer


def test_only_the_builder_runs_on_the_build_platform():
    """The builder's outputs (models, a pure wheel) fit any platform, so a multi-platform build runs it
    natively; each runtime stage is built for its target platform."""
    froms = {stage: text.splitlines()[0] for stage, text in stages().items()}
    assert set(froms) == {"builder", *RUNTIME_STAGES}
    assert froms["builder"].startswith("FROM --platform=$BUILDPLATFORM ")
    assert not any("--platform" in froms[stage] for stage in RUNTIME_STAGES)


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runtime_healthcheck_probes_the_worker_metrics_port_unless_overridden(stage):
    env = _stage_env(stage)
    (healthcheck,) = [i for i in _instructions(stage) if i.startswith("HEALTHCHECK ")]
    assert "os.environ['HEALTHCHECK_URL']" in healthcheck
    assert env["HEALTHCHECK_URL"] == f"http://127.0.0.1:{env['INFERSTREAM_METRICS_PORT']}/healthz"
    assert re.search(r'^CMD \["worker"\]', stages()[stage], re.M)  # the default command it fits
    bridge = _services()["bridge"]
    port = bridge["ports"][0].rsplit(":", 1)[-1]
    assert bridge["environment"]["HEALTHCHECK_URL"] == f"http://127.0.0.1:{port}/v2/health/live"


def test_the_worker_healthcheck_path_fails_while_the_event_loop_stands_still():
    path = "/" + _stage_env("cpu")["HEALTHCHECK_URL"].split("/", 3)[3]
    liveness = metrics.LoopLiveness()
    app = metrics.metrics_app(liveness)

    def status() -> str:
        statuses: list[str] = []
        b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda s, headers: statuses.append(s)))
        return statuses[0]

    assert status().startswith("503")
    liveness.beat()
    assert status().startswith("200")


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runtime_images_carry_oci_labels_from_build_args(stage):
    labels = dict(re.findall(r"org\.opencontainers\.image\.(\w+)=(\"[^\"]*\"|\S+)", stages()[stage]))
    assert OCI_LABELS <= set(labels), labels
    for key, arg in (("source", "SOURCE"), ("revision", "REVISION"), ("version", "VERSION")):
        assert labels[key] == f"${arg}"
        assert f"ARG {arg}" in _instructions(stage)
        assert re.search(rf"^ARG {arg}=\S+", DOCKERFILE.read_text(), re.M), f"{arg} has no default"
    assert labels["licenses"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert re.search(rf"^ARG VERSION={re.escape(version)}$", DOCKERFILE.read_text(), re.M)


def test_the_gpu_build_flag_reaches_the_model_build():
    (build_run,) = [i for i in _instructions("builder") if "python -m models.build" in i]
    assert "python -m models.build --repository /src/models/repository $MODELS_BUILD_ARGS " in build_run
    assert 'ARG MODELS_BUILD_ARGS=""' in _instructions("builder")
    args = _services()["worker"]["build"]["args"]
    assert args["MODELS_BUILD_ARGS"] == "${MODELS_BUILD_ARGS:-}"
    assert "MODELS_BUILD_ARGS" in _env_example()


# -- constraints ---------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    lines = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.!]+", line) for line in lines), lines
    return {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in (line.split("==") for line in lines)}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def test_constraints_pin_every_requirement_exactly():
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, extra_requirements in project["optional-dependencies"].items():
        if extra != "gpu":  # onnxruntime-gpu: pinned in pyproject.toml, not installable here
            requirements += extra_requirements
    assert requirements
    for requirement in requirements:
        assert _name(requirement) in pins, f"{requirement} is not in constraints.txt"
        exact = re.search(r"==([^,;\s]+)", requirement)
        if exact:
            assert pins[_name(requirement)] == exact.group(1), requirement
    assert "inferstream" not in pins
    torch = re.search(r"torch==(\S+)\+cpu$", DOCKERFILE.read_text(), re.M).group(1)
    assert pins["torch"] == torch  # without +cpu: the CPU index's 2.13.0+cpu satisfies it


def test_setup_installs_with_the_constraints_and_reinstalls_when_they_change():
    setup = (ROOT / "infra" / "local" / "setup.sh").read_text()
    assert re.search(r'pip install -c constraints\.txt -e "\.\[\$EXTRAS\]"', setup)
    stamp = re.search(r"^stamp=.*$", setup, re.M).group(0)
    assert "pyproject.toml" in stamp and "constraints.txt" in stamp


# -- compose -------------------------------------------------------------------------------------


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).parent / "check-jsonschema"
    if not tool.is_file():
        pytest.fail(f"check-jsonschema is not in {tool.parent}: install the dev extra")
    return subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_compose_matches_the_compose_schema(tmp_path):
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = _compose()
    broken["services"]["worker"]["healthcheck"] = {"tests": ["CMD", "true"]}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert _check_compose(path).returncode == 1


def _published() -> list[tuple[str, str]]:
    return [(name, str(port)) for name, svc in _services().items() for port in svc.get("ports", [])]


def test_published_ports_listen_on_loopback_unless_bind_addr_says_otherwise():
    assert len(_published()) >= 8
    for name, port in _published():
        assert port.startswith("${BIND_ADDR:-127.0.0.1}:"), f"{name}: {port}"
        assert _interpolate(port, {}).startswith("127.0.0.1:"), f"{name}: {port}"
        assert _interpolate(port, {"BIND_ADDR": "0.0.0.0"}).startswith("0.0.0.0:"), f"{name}: {port}"
    assert _env_example()["BIND_ADDR"] == "127.0.0.1"


def test_credentials_come_from_dot_env_and_have_no_defaults():
    required = _required_variables()
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= required
    credentials = 0
    for name, svc in _services().items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            if "://" in value and "@" in value:  # a password in a URL
                key, value = f"{key} (password)", value.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
            elif not CREDENTIAL.search(key):
                continue
            credentials += 1
            assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), f"{name}: {key} is not required from .env"
            with pytest.raises(ValueError):  # compose refuses to start without it
                _interpolate(value, {})
    assert credentials >= 8
    example = _env_example()
    assert required <= set(example), required - set(example)
    secrets = {k for k in required if CREDENTIAL.search(k) and not k.endswith("_USER")}
    assert secrets and all(example[k] == "" for k in secrets), "the example holds no usable secret"
    for ignore_file in (".gitignore", ".dockerignore"):
        assert ".env" in (ROOT / ignore_file).read_text().split(), ignore_file


def test_one_image_build_for_every_inferstream_service():
    services = _services()
    built = [name for name, svc in services.items() if "build" in svc]
    assert built == ["worker"]
    image = services["worker"]["image"]
    users = {name for name, svc in services.items() if svc.get("image") == image}
    assert users == {"worker", "bridge", "model-repository", "register-triton"}
    assert services["bridge"]["depends_on"]["worker"]["condition"] == "service_started"


def test_triton_serves_the_image_repository_and_is_registered():
    services = _services()
    copier, triton, register = services["model-repository"], services["triton"], services["register-triton"]
    assert "model-repository" in _compose()["volumes"]
    assert "model-repository:/models" in copier["volumes"]
    assert "/app/models/repository/." in " ".join(copier["command"])
    assert "model-repository:/models:ro" in triton["volumes"]
    assert triton["depends_on"]["model-repository"]["condition"] == "service_completed_successfully"
    assert register["depends_on"]["triton"]["condition"] == "service_healthy"
    command = register["command"]
    assert command[:2] == ["models", "register"] and command[2] in MODELS
    artifact = command[command.index("--artifact") + 1]
    repository = register["environment"]["INFERSTREAM_MODEL_REPOSITORY"]
    assert artifact == f"{repository}/{command[2]}/1/model.onnx"
    backends = [command[i + 1] for i, arg in enumerate(command) if arg == "--backend"]
    assert "triton=triton:8001" in backends
    assert "8001" in triton["expose"]
    assert register["environment"]["INFERSTREAM_TRITON_HOSTS"] == '["triton"]'
    assert int(command[command.index("--max-batch-size") + 1]) == MODELS[command[2]].max_batch_size


# -- Makefile ------------------------------------------------------------------------------------


def _make(*args: str) -> str:
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):(?!=)", makefile, re.M))
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    assert {"help", "image", "deploy", "coverage", "clean"} <= targets == phony
    listed = {line.split()[0] for line in _make("help").splitlines() if line.strip()}
    assert listed == targets
    assert _make() == _make("help")  # the default goal


def test_make_image_and_deploy_commands():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = _make("-n", "image", "TARGET=gpu")
    assert "docker build --target gpu --build-arg VERSION=" + version in image
    assert f"-t inferstream:{version}-gpu ." in image
    deploy = _make("-n", "deploy")
    assert ".venv/bin/kubectl apply -k infra/k8s/overlays/staging" in deploy
    assert (ROOT / "infra" / "k8s" / "overlays" / "staging" / "kustomization.yaml").is_file()
    assert "overlays/prod" in _make("-n", "deploy", "OVERLAY=prod")
