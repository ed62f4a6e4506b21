"""Point a kustomization's images at the digests the images job pushed.

    python pin_images.py KUSTOMIZATION IMAGE DIGESTS

DIGESTS is a folder with one file per image target (cpu, gpu) holding its sha256 digest.
"""

import pathlib
import sys

import yaml

TARGETS = {"inferstream": "cpu", "inferstream-gpu": "gpu"}  # the base's image names

path, image, digests = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
kustomization = yaml.safe_load(path.read_text())
for entry in kustomization["images"]:
    entry.pop("newTag", None)
    entry.update(newName=image, digest=(digests / TARGETS[entry["name"]]).read_text().strip())
path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
