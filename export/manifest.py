"""`manifest.json`: what an artifact folder holds, where it came from, and a sha256 for every file.

    {"manifest_version": 1, "exit_layer": 12, "target": "jetson-orin-nano", "source_model": "...",
     "revision": "<hub commit or null>", "edgekit_version": "0.1.0",
     "files": [{"path": "onnx-k12-fp16/vision_encoder.onnx", "sha256": "...", "bytes": 123, "format": "onnx",
                "quantization": "fp16"}, ...],
     ...further sections (memory check, gate results) as the stages add them}

Paths are relative to the folder, with forward slashes. `verify_hashes` re-reads every file and lists what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the artifact folder, forward slashes
    sha256: str
    bytes: int
    format: str  # onnx | gguf | json | ...
    quantization: str  # the scheme or file type; "none" for metadata files


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(folder: str | Path, path: str | Path, fmt: str, quantization: str) -> FileEntry:
    """Hash and size of `path` (absolute, or relative to `folder`) as a manifest entry."""
    folder = Path(folder)
    full = Path(path) if Path(path).is_absolute() else folder / path
    rel = full.relative_to(folder).as_posix()
    return FileEntry(rel, sha256_file(full), full.stat().st_size, fmt, quantization)


def edgekit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgekit")
    except PackageNotFoundError:
        return "unknown"


def write_manifest(
    folder: str | Path,
    *,
    exit_layer: int,
    target: str,
    source_model: str,
    revision: str | None,
    files: Iterable[FileEntry],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `folder/manifest.json`; `extra` adds sections (it cannot override the fields above)."""
    entries = sorted(files, key=lambda e: e.path)
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        raise ValueError(f"duplicate paths in the manifest: {sorted({p for p in paths if paths.count(p) > 1})}")
    if MANIFEST_FILE in paths:
        raise ValueError("the manifest cannot list itself")
    data: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "exit_layer": int(exit_layer),
        "exit_layer_convention": "1-based vision block k = HF hidden_states[k]",
        "target": target,
        "source_model": source_model,
        "revision": revision,
        "edgekit_version": edgekit_version(),
        "files": [asdict(e) for e in entries],
    }
    clash = set(data) & set(extra or {})
    if clash:
        raise ValueError(f"extra manifest sections clash with its fields: {sorted(clash)}")
    data |= dict(extra or {})
    path = Path(folder) / MANIFEST_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    return partial.replace(path)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest as a dict, with `files` as FileEntry tuples."""
    path = Path(folder) / MANIFEST_FILE
    data = json.loads(path.read_text())
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest_version {data.get('manifest_version')!r}, expected {MANIFEST_VERSION}")
    data["files"] = tuple(FileEntry(**entry) for entry in data["files"])
    return data


def verify_hashes(folder: str | Path) -> list[str]:
    """Every problem with the folder against its manifest (empty when all is well): a missing manifest, a missing
    file, a size or sha256 that differs, a file present but not listed."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return [f"{folder}: no {MANIFEST_FILE}"]
    except (ValueError, TypeError, KeyError) as err:  # JSONDecodeError is a ValueError
        return [f"{folder / MANIFEST_FILE}: unreadable ({err})"]
    problems = []
    for entry in manifest["files"]:
        path = folder / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
        elif path.stat().st_size != entry.bytes:
            problems.append(f"{entry.path}: {path.stat().st_size} bytes, manifest says {entry.bytes}")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
    listed = {e.path for e in manifest["files"]} | {MANIFEST_FILE}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems
