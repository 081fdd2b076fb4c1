"""A build on a device: `edgekit bench --device` and `edgekit verify --device`. The build's artifacts go to the device
as a bundle; the device answers (the eval split, for the gate) or measures (latency, peak RSS); the build machine
judges the answers against the baselines and limits the build recorded. Results land in BUILD/devices/<label>/
(device.json: what the device is; bench.json; safety.json and answers_<runtime>.jsonl), and the build's report and
manifest are written again to include them."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgekit.build.artifact_stages import BENCH_FILE
from edgekit.build.stages import BUILD_MARK
from edgekit.devices.bundle import is_bundle, make_bundle, read_bundle, shipped_runtimes
from edgekit.devices.runners import Device
from edgekit.errors import UserError
from edgekit.outputs import atomic_dir

DEVICES_DIR = "devices"
DEVICE_FILE = "device.json"


@contextmanager
def bundle_for(folder: Path, runtimes: Sequence[str] | None, log: Callable[[str], None]) -> Iterator[tuple[Path, dict]]:
    """(folder, description) of `folder` when it is a bundle, else of a bundle made from it for the call (beside it,
    so the artifacts are hard links, not copies)."""
    if is_bundle(folder):
        bundle = read_bundle(folder)
        missing = [k for k in runtimes or () if k not in bundle["runtimes"]]
        if missing:
            raise UserError(
                f"{folder}: the bundle has no {', '.join(missing)} (it has {', '.join(bundle['runtimes'])})"
            )
        yield folder, bundle
        return
    with tempfile.TemporaryDirectory(prefix=".edgekit-bundle-", dir=folder.resolve().parent) as tmp:
        made = make_bundle(folder, Path(tmp) / "bundle", runtimes, log=log)
        yield made, read_bundle(made)


def write_device_results(out: Path, device: Device, facts: dict, write: Callable[[Path], None]) -> None:
    """BUILD/devices/<label>/: the device's facts, what `write(folder)` writes, and the files of earlier runs that it
    does not replace; then the build's report and manifest again. A folder that is not a build folder is left alone."""
    from edgekit.build.report import refresh_report

    if not (out / BUILD_MARK).is_file():
        return
    folder = out / DEVICES_DIR / device.label
    with atomic_dir(folder, overwrite=True) as tmp:
        if folder.is_dir():
            for old in folder.iterdir():
                shutil.copy2(old, tmp / old.name)
        (tmp / DEVICE_FILE).write_text(json.dumps(facts, indent=2))
        write(tmp)
    refresh_report(out)


def bench_on_device(
    folder: str | Path,
    device: Device,
    runtimes: Sequence[str] | None = None,
    prompts: int = 5,
    max_new_tokens: int = 24,
    llama_bin: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Each runtime of a build, export or bundle folder measured on `device`, each in its own process there (with
    `llama_bin`: llama.cpp's llama-bench on the `gguf` language model instead, no Python needed):
    {"device": facts, "rows": {runtime: bench row}}. A build folder keeps it in devices/<label>/bench.json."""
    from edgekit.devices.jobs import run_job
    from edgekit.devices.runtime import Prompt
    from edgekit.safety.suite import builtin_suite

    folder = Path(folder).resolve()
    items = builtin_suite().select("eval", kinds=("utility",), limit_per_kind=prompts)
    timed = [Prompt(item.image(), item.prompt) for item in items]
    if llama_bin:
        rows, python = {"gguf": _bench_with_tools(folder, device, Path(llama_bin), timed[0], max_new_tokens, log)}, None
    else:
        with bundle_for(folder, runtimes, log) as (bundle_dir, bundle):
            chosen = tuple(runtimes or bundle["runtimes"])
            result = run_job(
                device, bundle_dir, bundle, "bench", chosen, timed, max_new_tokens, rounds=len(items), log=log
            )
        rows, python = result["runtimes"], result["python"]
    measured = {"device": {**device.facts(), **({"python": python} if python else {})}, "rows": rows}
    write_device_results(
        folder, device, measured["device"], lambda f: (f / BENCH_FILE).write_text(json.dumps(measured, indent=2))
    )
    return measured


def _bench_with_tools(folder: Path, device: Device, llama_bin: Path, prompt, max_new_tokens: int, log) -> dict:
    """llama-bench at the length of `prompt` as the export's processor tokenizes it, image tokens included."""
    from edgekit.devices.bundle import export_folder
    from edgekit.devices.llama_tools import bench_with_tools, copy_tools
    from edgekit.devices.runtime import export_files, open_processor, processor_inputs

    export = export_folder(folder)
    processor = open_processor(export_files("gguf", export)["processor_dir"])
    tokens = processor_inputs(processor, prompt, "np")["input_ids"].shape[1]
    with tempfile.TemporaryDirectory(prefix=".edgekit-tools-", dir=export.parent) as tmp:
        remote = copy_tools(device, llama_bin, export, Path(tmp), log)
    return bench_with_tools(device, remote, tokens, max_new_tokens)


def verify_on_device(
    out: Path, device: Device, cfg, recorded, llama_bin: str | Path | None = None, log: Callable[[str], None] = print
) -> tuple:
    """The build's gate with every device runtime's answers given by `device` (with `llama_bin`: the `gguf`
    artifacts' answers from llama.cpp's llama-mtmd-cli, no Python needed); the verdicts (failed ones included).
    The PyTorch checkpoint does not go to a device: the build machine's verdict on it stands."""
    from edgekit.build.artifact_stages import PYTORCH
    from edgekit.build.stages import Stage
    from edgekit.devices.jobs import run_job
    from edgekit.devices.runtime import Prompt
    from edgekit.safety.gate import (
        Evaluated,
        GateRecord,
        gate_verdicts,
        judged,
        metric_values,
        write_answers,
        write_gate,
    )
    from edgekit.safety.judges import make_judge
    from edgekit.safety.suite import builtin_suite

    judge = make_judge(cfg.judge)
    items = builtin_suite().select("eval", limit_per_kind=cfg.limit_per_kind)
    export = out / Stage.EXPORT
    runtimes = shipped_runtimes(export, ("gguf",) if llama_bin else None)
    prompts = [Prompt(item.image(), item.prompt) for item in items]
    log(f"{device.label}: {len(items)} prompts for {', '.join(runtimes)}")
    if llama_bin:
        from edgekit.devices.llama_tools import answer_with_tools, copy_tools

        with tempfile.TemporaryDirectory(prefix=".edgekit-tools-", dir=out.parent) as tmp:
            remote = copy_tools(device, Path(llama_bin), export, Path(tmp), log)
        texts = answer_with_tools(device, remote, prompts, cfg.max_new_tokens, log)
        result = {"runtimes": {"gguf": {"answers": [{"text": t} for t in texts]}}}
    else:
        with bundle_for(out, runtimes, log) as (bundle_dir, bundle):
            result = run_job(device, bundle_dir, bundle, "answer", runtimes, prompts, cfg.max_new_tokens, log=log)
    evaluated = {}
    for kind, answered in result["runtimes"].items():
        if "error" in answered:
            evaluated[kind] = Evaluated(None, [], f"on {device.label}: {answered['error']}")
            continue
        layer = judged(items, [a["text"] for a in answered["answers"]], judge, cfg.exit_layer)
        evaluated[kind] = Evaluated(metric_values(layer), list(layer.answers), None)
    verdicts = gate_verdicts(evaluated, recorded.baselines, recorded.limits, aligned_artifact=PYTORCH)

    def write(folder: Path) -> None:
        write_gate(folder, GateRecord(recorded.baselines, recorded.limits, verdicts))
        for kind, evaluation in evaluated.items():
            write_answers(folder / f"answers_{kind}.jsonl", evaluation.answers)

    python = {"python": result["python"]} if "python" in result else {"runtime": "llama.cpp tools"}
    write_device_results(out, device, {**device.facts(), **python}, write)
    for v in verdicts:
        log(f"{v.artifact} on {device.label}: {'pass' if v.passed else 'FAIL'}")
    return verdicts
