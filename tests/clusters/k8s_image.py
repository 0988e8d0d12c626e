#!/usr/bin/env python3
"""Pack layer tarballs as a docker-archive that `ctr image import` accepts (no Docker, no registry).

    k8s_image.py NAME:TAG OUT.tar LAYER.tar [LAYER.tar ...] [--env K=V ...] [--entrypoint ARG ...]

Layers are listed bottom first; each is a plain tar of files (an upper layer only adds files).
Why a script: the test node has no image builder, and a docker-archive is a small, documented
format (manifest.json + image config + layer tars) that containerd imports offline.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile

DEFAULT_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_config(diff_ids: list[str], env: list[str], entrypoint: list[str]) -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "Entrypoint": entrypoint or None, "Cmd": None if entrypoint else ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]},
    }
    return json.dumps(config, sort_keys=True).encode()


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def pack(name: str, out: str, layers: list[str], env: list[str], entrypoint: list[str]) -> None:
    diff_ids = [sha256_of(layer) for layer in layers]
    config = image_config(diff_ids, env, entrypoint)
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_names = [f"{d}/layer.tar" for d in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [name], "Layers": layer_names}]
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w") as archive:
        add_bytes(archive, config_name, config)
        add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
        for layer, layer_name in zip(layers, layer_names):
            archive.add(layer, layer_name)
    os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("out")
    parser.add_argument("layers", nargs="+")
    parser.add_argument("--env", action="append", default=[], help="K=V (PATH defaults to the venv first)")
    parser.add_argument("--entrypoint", nargs="*", default=[])
    args = parser.parse_args()
    env = args.env if any(e.startswith("PATH=") for e in args.env) else [f"PATH={DEFAULT_PATH}", *args.env]
    pack(args.name, args.out, args.layers, env, args.entrypoint)
    print(args.out)


if __name__ == "__main__":
    main()
