"""`edgekit bundle`: what a device needs to run a build's artifacts, in one folder to copy to the board.

    BUNDLE/
      edgekit_bundle.json   id, edgekit version and source hash, the runtimes and their files, every file's
                            size and sha256
      requirements.txt      the device's pip requirements for these runtimes (no torch, no transformers)
      edgekit/              the torch-free part of edgekit: the runtimes, the device processor, the bench
                            harness and the job runner (`edgekit.devices.on_device`)
      artifacts/            the export's files these runtimes load, under their export paths

Artifact files are hard links where the file system allows (a bundle of a 7B export costs no second copy), copies
otherwise. Their sha256 come from the export's manifest, which already hashed them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from edgekit.devices.on_device import BUNDLE_FILE, JOB_VERSION, LIBRARIES, PROCESSOR_LIBRARIES, JobError, check_bundle
from edgekit.errors import UserError
from edgekit.units import human_bytes

BUNDLE_VERSION = 1
ARTIFACTS = "artifacts"
REQUIREMENTS_FILE = "requirements.txt"
# edgekit's modules a device imports, and no others: the torch-free test runs a bundle that holds only these.
DEVICE_MODULES = (
    "edgekit",
    "edgekit.errors",
    "edgekit.machine",
    "edgekit.export",
    "edgekit.export.onnx_format",
    "edgekit.devices",
    "edgekit.devices.runtime",
    "edgekit.devices.processor",
    "edgekit.devices.onnx_runtime",
    "edgekit.devices.llama_runtime",
    "edgekit.devices.genai_runtime",
    "edgekit.devices.bench",
    "edgekit.devices.on_device",
)
DEVICE_RUNTIMES = ("onnx", "gguf", "hybrid", "ortgenai")  # every runtime but pytorch, which needs torch


def export_folder(folder: str | Path) -> Path:
    """The export folder of a build folder (its 04_export), or `folder` itself when it is an export folder."""
    from edgekit.build.stages import BUILD_MARK, Stage
    from edgekit.export.manifest import MANIFEST_FILE

    folder = Path(folder)
    if (folder / BUILD_MARK).is_file():
        folder = folder / Stage.EXPORT
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file() or "artifacts" not in json.loads(manifest.read_text()):
        raise UserError(f"{folder}: neither an edgekit build folder nor an export folder (no export {MANIFEST_FILE})")
    return folder


def shipped_runtimes(export: Path, runtimes: Sequence[str] | None) -> tuple[str, ...]:
    """`runtimes`, or every device runtime the export ships (its manifest's runtime sets), each checked to exist."""
    from edgekit.devices.runtime import export_files
    from edgekit.export.manifest import read_manifest

    chosen = tuple(runtimes) if runtimes else tuple(read_manifest(export)["memory"]["sets"])
    for kind in chosen:
        if kind not in DEVICE_RUNTIMES:
            raise UserError(f"{kind!r} does not run on a device; choose from {', '.join(DEVICE_RUNTIMES)}")
        export_files(kind, export)  # one line naming what the export lacks for it
    return chosen


def requirements(runtimes: Sequence[str]) -> list[str]:
    """pip requirements for `runtimes`, with the version floors edgekit itself declares."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("edgekit") or []
    except PackageNotFoundError:
        declared = []
    floors = {_requirement_name(r): r.split(";")[0].strip() for r in declared}
    packages = dict.fromkeys([*PROCESSOR_LIBRARIES.values(), *(p for k in runtimes for p in LIBRARIES[k].values())])
    return [floors.get(name, name) for name in packages]


def _requirement_name(requirement: str) -> str:
    name = requirement
    for stop in "<>=!~[; ":
        name = name.split(stop)[0]
    return name.lower()


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def make_bundle(
    folder: str | Path,
    out: str | Path,
    runtimes: Sequence[str] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """A bundle of `runtimes` (default: every device runtime the export ships) from a build or export folder."""
    from edgekit.build.stages import code_identity
    from edgekit.devices.runtime import export_files
    from edgekit.export.manifest import edgekit_version, read_manifest
    from edgekit.outputs import atomic_dir

    export = export_folder(folder)
    chosen = shipped_runtimes(export, runtimes)
    manifest = read_manifest(export)
    entries = {f.path: f for f in manifest["files"]}
    files, layout = [], {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for kind in chosen:
            paths = {key: path.relative_to(export).as_posix() for key, path in export_files(kind, export).items()}
            layout[kind] = {key: f"{ARTIFACTS}/{path}" for key, path in paths.items()}
            for path in paths.values():
                for entry in (e for name, e in entries.items() if name == path or name.startswith(path + "/")):
                    if not (tmp / ARTIFACTS / entry.path).exists():  # runtimes share files (the processor)
                        link_or_copy(export / entry.path, tmp / ARTIFACTS / entry.path)
                        files.append(
                            {"path": f"{ARTIFACTS}/{entry.path}", "sha256": entry.sha256, "bytes": entry.bytes}
                        )
        for module in DEVICE_MODULES:
            source = Path(importlib.util.find_spec(module).origin)
            rel = module.replace(".", "/") + ("/__init__.py" if source.name == "__init__.py" else ".py")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / rel)
            files.append(_hashed(tmp, rel))
        (tmp / REQUIREMENTS_FILE).write_text("\n".join(requirements(chosen)) + "\n")
        files.append(_hashed(tmp, REQUIREMENTS_FILE))
        files.sort(key=lambda f: f["path"])
        description = {
            "bundle_version": BUNDLE_VERSION,
            "job_version": JOB_VERSION,
            "id": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
            "edgekit_version": edgekit_version(),
            "edgekit_source": code_identity(),
            "made_from": str(export.resolve()),
            "exit_layer": manifest["exit_layer"],
            "target": manifest["target"],
            "runtimes": layout,
            "files": files,
        }
        (tmp / BUNDLE_FILE).write_text(json.dumps(description, indent=2))
    size = human_bytes(sum(f["bytes"] for f in files), "decimal")
    log(f"bundled {', '.join(chosen)}: {len(files)} files, {size} in {out}")
    return Path(out)


def _hashed(root: Path, rel: str) -> dict:
    from edgekit.export.manifest import sha256_file

    return {"path": rel, "sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}


def read_bundle(folder: str | Path) -> dict:
    """A bundle's description, once it is whole and was made by this edgekit (its runner must read our jobs)."""
    from edgekit.build.stages import code_identity

    try:
        bundle = check_bundle(Path(folder))
    except JobError as err:
        raise UserError(str(err)) from None
    if bundle.get("bundle_version") != BUNDLE_VERSION or bundle["edgekit_source"] != code_identity():
        raise UserError(
            f"{folder}: made by another edgekit ({bundle.get('edgekit_version')}, source "
            f"{bundle.get('edgekit_source', '?')[:12]}): make it again with `edgekit bundle`"
        )
    return bundle


def is_bundle(folder: str | Path) -> bool:
    return (Path(folder) / BUNDLE_FILE).is_file()
