"""Point a kustomization's images at the digests the images job pushed.

    python pin_images.py KUSTOMIZATION IMAGE DIGESTS

DIGESTS is a folder with one file per image target (cpu, gpu) holding its sha256 digest. A
digest that is not `sha256:` and 64 hex digits (a push that gave none, a damaged artifact) stops
the deploy before the overlay is touched.
"""

import pathlib
import re
import sys

import yaml

TARGETS = {"inferstream": "cpu", "inferstream-gpu": "gpu"}  # the base's image names
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

path, image, digests = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
kustomization = yaml.safe_load(path.read_text())
for entry in kustomization["images"]:
    digest = (digests / TARGETS[entry["name"]]).read_text().strip()
    if not DIGEST.fullmatch(digest):
        sys.exit(f"the {TARGETS[entry['name']]} image's digest is not sha256:<64 hex digits>: {digest[:80]!r}")
    entry.pop("newTag", None)
    entry.update(newName=image, digest=digest)
path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
