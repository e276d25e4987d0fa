"""An artifact directory as the board sees it: manifest.json and the files it lists by sha256.

Nothing is loaded before every listed file has been hashed and matched, so a tampered or
truncated file is refused with its name.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from device.errors import UserError

MANIFEST = "manifest.json"


class ArtifactError(UserError):
    """A missing, corrupted or incompatible artifact file (one line, names the file)."""


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(artifact_dir) -> dict:
    """Read manifest.json and check every file it lists; returns the manifest."""
    d = Path(artifact_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d}: not an artifact directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    for name, digest in files.items():
        f = d / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{path}: file entry '{name}' points outside the artifact")
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in {MANIFEST} but missing")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 does not match {MANIFEST}; the file was changed or corrupted")
    return manifest


def write_manifest(artifact_dir, manifest: dict) -> dict:
    """Fill manifest['files'] with the sha256 of every other file in the directory and write it."""
    d = Path(artifact_dir)
    files = {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = {**manifest, "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def missing_cpu_flags(required, cpuinfo: str | None = None, machine: str | None = None) -> list[str]:
    """Those of `required` (/proc/cpuinfo flag names) this CPU lacks; none when its flags cannot
    be read: no /proc/cpuinfo, or none of this architecture's (under qemu-user it is the host's)."""
    key = {"x86_64": "flags", "aarch64": "Features"}.get(machine or platform.machine())
    if key is None:
        return []
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            have = set(value.split())
            return [f for f in required if f not in have]
    return []
