"""The Dockerfile's stages, as the deployment tests read them."""

from __future__ import annotations

import re

from infra.local import ROOT

DOCKERFILE = ROOT / "Dockerfile"
# A stage's first line: FROM [--platform=P] IMAGE AS NAME
FROM_LINE = re.compile(r"FROM\s+(?:--platform=(?P<platform>\S+)\s+)?(?P<image>\S+)\s+AS\s+(?P<name>\S+)", re.I)


def stages() -> dict[str, str]:
    """Each stage's text (from its FROM line to the next stage) by its name."""
    parts = re.split(r"^(?=FROM\s)", DOCKERFILE.read_text(), flags=re.M)
    return {_from(p)["name"].lower(): p for p in parts if p.startswith("FROM")}


def base_images() -> dict[str, str]:
    """Each stage's base image by the stage's name."""
    return {name: _from(text)["image"] for name, text in stages().items()}


def _from(stage: str) -> re.Match[str]:
    match = FROM_LINE.match(stage)
    assert match, f"not a FROM ... AS ... line: {stage.splitlines()[0]}"
    return match
