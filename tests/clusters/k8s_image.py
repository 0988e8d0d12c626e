#!/usr/bin/env python3
"""Pack layer tarballs as an OCI image archive that `ctr image import` accepts (no Docker, no registry).

    k8s_image.py NAME:TAG OUT.tar|- LAYER.tar [LAYER.tar ...] [--present LAYER.tar ...]
                 [--env K=V ...] [--entrypoint ARG ...]

Layers are listed bottom first; each is a plain, uncompressed tar of files (an upper layer only
adds files), so a layer's blob digest is its diff id. `--present` names layers that containerd
already holds (imported before as another image): the manifest references them by digest but
their bytes are not packed, so importing the image only reads and unpacks the layers that are new.
`ctr image import` skips the unpacking of a layer whose snapshot exists, which is how a thin
layer over a 1.4 GB base imports in seconds. `-` as OUT streams the archive to stdout (for
`| ctr image import -`, without writing the base's bytes to disk a second time).

Why a script: the test node has no image builder, and an OCI image layout (index.json,
manifest, config and blobs/sha256/...) is a small, documented format that containerd imports
offline. Layer digests are cached beside each layer (LAYER.tar.sha256, keyed by size and mtime):
hashing the base layer costs seconds on every build otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass

DEFAULT_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
NAME_ANNOTATION = "io.containerd.image.name"  # the name `ctr image import` gives the image


@dataclass(frozen=True)
class Layer:
    path: str
    digest: str  # hex sha256 of the uncompressed tar: blob digest and diff id at once
    size: int
    packed: bool


def sha256_of(path: str) -> str:
    """The file's sha256, from the sidecar cache when the file is unchanged since it was hashed."""
    st = os.stat(path)
    stamp = f"{st.st_size}-{st.st_mtime_ns}"
    cache = path + ".sha256"
    try:
        cached_stamp, cached = open(cache).read().split()
        if cached_stamp == stamp:
            return cached
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    try:
        with open(cache, "w") as out:
            out.write(f"{stamp} {digest.hexdigest()}\n")
    except OSError:  # a read-only cache only costs the hashing next time
        pass
    return digest.hexdigest()


def descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data),
            **extra}


def image_config(layers: list[Layer], env: list[str], entrypoint: list[str]) -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "Entrypoint": entrypoint or None, "Cmd": None if entrypoint else ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer.digest}" for layer in layers]},
    }
    return json.dumps(config, sort_keys=True).encode()


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def pack(name: str, out: str, layers: list[Layer], env: list[str], entrypoint: list[str]) -> None:
    config = image_config(layers, env, entrypoint)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": descriptor(CONFIG_TYPE, config),
        "layers": [{"mediaType": LAYER_TYPE, "digest": f"sha256:{layer.digest}", "size": layer.size}
                   for layer in layers],
    }, sort_keys=True).encode()
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [descriptor(
        MANIFEST_TYPE, manifest, annotations={NAME_ANNOTATION: name, "org.opencontainers.image.ref.name": tag})]},
        sort_keys=True).encode()
    stream = out == "-"
    tmp = out + ".tmp"
    with (tarfile.open(fileobj=sys.stdout.buffer, mode="w|") if stream else tarfile.open(tmp, "w")) as archive:
        add_bytes(archive, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        for data in (config, manifest):
            add_bytes(archive, f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data)
        for layer in layers:
            if layer.packed:
                archive.add(layer.path, f"blobs/sha256/{layer.digest}")
        add_bytes(archive, "index.json", index)
    if not stream:
        os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("out", help="the archive to write, or - for stdout")
    parser.add_argument("layers", nargs="+")
    parser.add_argument("--present", action="append", default=[],
                        help="a layer (one of LAYERS) containerd already holds: referenced, not packed")
    parser.add_argument("--env", action="append", default=[], help="K=V (PATH defaults to the venv first)")
    parser.add_argument("--entrypoint", nargs="*", default=[])
    args = parser.parse_args()
    unknown = set(args.present) - set(args.layers)
    if unknown:
        parser.error(f"--present names a layer that is not in LAYERS: {', '.join(sorted(unknown))}")
    env = args.env if any(e.startswith("PATH=") for e in args.env) else [f"PATH={DEFAULT_PATH}", *args.env]
    layers = [Layer(p, sha256_of(p), os.path.getsize(p), p not in args.present) for p in args.layers]
    pack(args.name, args.out, layers, env, args.entrypoint)
    if args.out != "-":
        print(args.out)


if __name__ == "__main__":
    main()
