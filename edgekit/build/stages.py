"""A build's stages: their folder names, and the engine that runs a stage unless its inputs are unchanged.

Each stage writes OUT/NN_name/ whole or not at all, then its stage.json: its inputs (settings, the hashes of the
stages it reads, and edgekit's own source) and the hash of what it wrote. A rerun reuses a stage whose inputs are
unchanged, so a killed build picks up where it stopped; another edgekit (a fixed exporter, a new runtime) redoes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgekit.machine import release_freed_memory

STAGE_FILE = "stage.json"
BUILD_MARK = "build_config.json"  # the resolved config; also marks a folder as a build (a rerun may write into it)


class Stage(StrEnum):
    """The stage folders of a build, in the order they run."""

    SCAN = "01_scan"  # the original model at its default exit layer, at K and at a few more layers
    ALIGN = "02_align"  # L-PPO (or the SFT baseline) at exit layer K
    TRUNCATE = "03_truncate"  # the aligned model cut to K vision blocks: a plain Hugging Face checkpoint
    EXPORT = "04_export"  # ONNX and GGUF artifacts for the target, with their own manifest
    SAFETY = "05_safety"  # the aligned model scanned again; every artifact through the gate
    BENCH = "06_bench"  # latency and peak memory of each runtime, each in a fresh process


def tree_hash(folder: Path, skip: tuple[str, ...] = (STAGE_FILE,)) -> str:
    """sha256 over every file's relative path and content."""
    from edgekit.export.manifest import sha256_file

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def source_identity(source: str, revision: str | None) -> str:
    """A local model folder by content; a hub id by id and revision (pin --revision for a reproducible build)."""
    path = Path(source)
    return tree_hash(path, skip=()) if path.is_dir() else f"hub:{source}@{revision or 'main'}"


def code_identity() -> str:
    """sha256 of edgekit's own source and data files (the installed packages edgekit, .export and .devices)."""
    import edgekit
    import edgekit.devices
    import edgekit.export

    digest = hashlib.sha256()
    for package in (edgekit, edgekit.export, edgekit.devices):
        root = Path(package.__path__[0])
        files = (p for p in root.rglob("*") if p.suffix in (".py", ".jsonl", ".toml") and "__pycache__" not in p.parts)
        for path in sorted(files):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes())
    return digest.hexdigest()


class Stages:
    """Runs each stage unless its stage.json shows the same inputs, edgekit's source among them; records what it
    wrote."""

    def __init__(self, out: Path, log: Callable[[str], None]):
        self.out, self.log, self.reused = out, log, []
        self.code = code_identity()

    def output_hash(self, name: Stage) -> str:
        return json.loads((self.out / name / STAGE_FILE).read_text())["output_sha256"]

    def run(self, name: Stage, inputs: dict[str, Any], write: Callable[[Path], bool | None]) -> Path:
        """`write(folder)` must create `folder` whole or not at all; returning False leaves the stage unfinished
        (it reruns next time: a result that a failing runtime or judge produced is never reused)."""
        folder, record = self.out / name, self.out / name / STAGE_FILE
        inputs = {**inputs, "edgekit_source": self.code}
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        if record.is_file() and json.loads(record.read_text()).get("inputs_sha256") == fingerprint:
            self.log(f"{name}: inputs unchanged, reused")
            self.reused.append(name)
            return folder
        self.log(f"{name}: running")
        start = time.time()
        written = write(folder)
        release_freed_memory()  # what the stage loaded is gone before the next one loads its own
        if written is False:
            return folder
        stage = {
            "stage": name,
            "inputs": inputs,
            "inputs_sha256": fingerprint,
            "output_sha256": tree_hash(folder),
            "seconds": round(time.time() - start, 1),
        }
        partial = record.with_name(STAGE_FILE + ".partial")
        partial.write_text(json.dumps(stage, indent=2, default=str))
        partial.replace(record)
        return folder


def clean_partial(out: Path) -> None:
    """Temporary folders a killed stage left beside its output (atomic_dir names them .NAME.*)."""
    for path in out.glob(".0*"):
        if path.is_dir() and not path.name.endswith(".work"):
            shutil.rmtree(path, ignore_errors=True)
