"""What runs on the device, from inside a bundle (`edgekit bundle`). Torch-free: it imports numpy, onnxruntime,
onnxruntime-genai, llama-cpp-python, tokenizers, jinja2 and Pillow at most, and only edgekit's modules the bundle
carries.

    cd BUNDLE && PYTHONPATH=. python3 -m edgekit.devices.on_device JOB_DIR

JOB_DIR/job.json (written by `edgekit.devices.jobs`) asks for one of

    bench   each runtime in its own measurement process (`edgekit.devices.bench.lockstep`): time to first token,
            vision encode and prefill ms, decode tokens/s, the process's peak RSS
    answer  each runtime's greedy answers to the prompts: what the safety gate judges

and names the bundle it was written for. The result goes to JOB_DIR/result.json, whole or not at all: per runtime
its answers or measurements, and the machine and Python that produced them. A runtime that
fails is recorded as that runtime's error (the gate fails it); a job for another bundle, a bundle with missing or cut
files, or a missing library is one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

BUNDLE_FILE = "edgekit_bundle.json"
JOB_FILE = "job.json"
RESULT_FILE = "result.json"
JOB_VERSION = 1  # the job and result format; a host and a bundle must agree on it
# The Python modules each runtime needs on the device, as pip names them in the bundle's requirements.txt.
LIBRARIES = {
    "onnx": {"onnxruntime": "onnxruntime"},
    "gguf": {"llama_cpp": "llama-cpp-python"},
    "hybrid": {"onnxruntime": "onnxruntime", "llama_cpp": "llama-cpp-python"},
    "ortgenai": {"onnxruntime_genai": "onnxruntime-genai"},
}
PROCESSOR_LIBRARIES = {"numpy": "numpy", "tokenizers": "tokenizers", "jinja2": "jinja2", "PIL": "pillow"}


class JobError(Exception):
    """The job cannot run on this device: one line, exit code 2."""


def check_bundle(root: Path) -> dict:
    """The bundle's description, once every file it lists is present at its size (a partial copy is refused)."""
    path = root / BUNDLE_FILE
    if not path.is_file():
        raise JobError(f"{root}: not an edgekit bundle (no {BUNDLE_FILE})")
    bundle = json.loads(path.read_text())
    for entry in bundle["files"]:
        file = root / entry["path"]
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            size = file.stat().st_size if file.is_file() else "missing"
            raise JobError(f"{root}: partial bundle: {entry['path']} is {size}, expected {entry['bytes']} bytes")
    return bundle


def check_libraries(runtimes) -> None:
    missing = []
    for kind in runtimes:
        for module, package in {**PROCESSOR_LIBRARIES, **LIBRARIES[kind]}.items():
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(package)
    if missing:
        names = " ".join(dict.fromkeys(missing))
        raise JobError(f"{sys.executable} cannot import {names}: pip install -r requirements.txt in the bundle")


def runtime_files(root: Path, bundle: dict, kind: str) -> dict[str, str]:
    return {key: str(root / path) for key, path in bundle["runtimes"][kind].items()}


def answer(root: Path, bundle: dict, job: dict, work: Path) -> dict:
    from PIL import Image

    from edgekit.devices.runtime import Prompt, open_files

    prompts = [Prompt(Image.open(work / p["image"]).convert("RGB"), p["text"]) for p in job["prompts"]]
    out: dict[str, dict] = {}
    for kind in job["runtimes"]:
        try:
            runtime = open_files(kind, runtime_files(root, bundle, kind), **job.get("options", {}).get(kind, {}))
            answers = []
            for i, prompt in enumerate(prompts):
                tokens = runtime.generate(prompt, job["max_new_tokens"])
                answers.append({"tokens": tokens, "text": runtime.decode(tokens)})
                print(f"answer {kind}: {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
            out[kind] = {"answers": answers}
        except Exception as err:  # recorded, and failed by the gate: one runtime's failure is not the job's
            out[kind] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    return out


def bench(root: Path, bundle: dict, job: dict, work: Path) -> dict:
    from edgekit.devices.bench import bench_row, decode_spec, lockstep

    prompts = [{"image": str(work / p["image"]), "text": p["text"]} for p in job["prompts"]]
    specs = {
        kind: decode_spec(
            kind, runtime_files(root, bundle, kind), prompts, job["max_new_tokens"], job.get("options", {}).get(kind)
        )
        for kind in job["runtimes"]
    }
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        measured = lockstep(Path(tmp), specs, rounds=job["rounds"], log=log)
    return {kind: bench_row(kind, measured[kind], len(prompts)) for kind in job["runtimes"]}


COMMANDS = {"answer": answer, "bench": bench}


def run(work: Path, root: Path) -> None:
    job = json.loads((work / JOB_FILE).read_text())
    if job.get("job_version") != JOB_VERSION:
        raise JobError(f"job format {job.get('job_version')} but this bundle's runner reads {JOB_VERSION}")
    bundle = check_bundle(root)
    if job["bundle"] != bundle["id"]:
        raise JobError(f"the job was written for bundle {job['bundle'][:16]}, this is {bundle['id'][:16]}")
    unknown = [kind for kind in job["runtimes"] if kind not in bundle["runtimes"]]
    if unknown:
        raise JobError(f"the bundle has no {', '.join(unknown)} runtime (it has {', '.join(bundle['runtimes'])})")
    check_libraries(job["runtimes"])
    result = {
        "job_version": JOB_VERSION,
        "command": job["command"],
        "python": {"machine": platform.machine(), "version": platform.python_version()},
        "runtimes": COMMANDS[job["command"]](root, bundle, job, work),
    }
    partial = work / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(result))
    os.replace(partial, work / RESULT_FILE)


def main() -> None:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    root = Path(__file__).resolve().parents[2]  # BUNDLE/edgekit/devices/on_device.py
    try:
        run(Path(sys.argv[1]).resolve(), root)
    except JobError as err:
        print(f"edgekit on device: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
