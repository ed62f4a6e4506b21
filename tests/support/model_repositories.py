"""Model repositories made for a test from the built ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def pooled_repository(source: Path, target: Path, name: str) -> Path:
    """A model repository holding the tiny model under another name: a model that only another
    worker group serves."""
    shutil.copytree(source / "tiny", target / name)
    spec_file = target / name / "inferstream.json"
    spec = json.loads(spec_file.read_text())
    spec["name"] = name
    spec_file.write_text(json.dumps(spec))
    config = target / name / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "tiny"', f'name: "{name}"'))
    return target
