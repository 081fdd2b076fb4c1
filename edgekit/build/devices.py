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
    log: Callable[[str], None] = print,
) -> dict:
    """Each runtime of a build, export or bundle folder measured on `device`, each in its own process there:
    {"device": facts, "rows": {runtime: bench row}}. A build folder keeps it in devices/<label>/bench.json."""
    from edgekit.devices.jobs import run_job
    from edgekit.devices.runtime import Prompt
    from edgekit.safety.suite import builtin_suite

    folder = Path(folder).resolve()
    items = builtin_suite().select("eval", kinds=("utility",), limit_per_kind=prompts)
    with bundle_for(folder, runtimes, log) as (bundle_dir, bundle):
        chosen = tuple(runtimes or bundle["runtimes"])
        result = run_job(
            device,
            bundle_dir,
            bundle,
            "bench",
            chosen,
            [Prompt(item.image(), item.prompt) for item in items],
            max_new_tokens,
            rounds=len(items),
            log=log,
        )
    measured = {"device": {**device.facts(), "python": result["python"]}, "rows": result["runtimes"]}
    write_device_results(
        folder, device, measured["device"], lambda f: (f / BENCH_FILE).write_text(json.dumps(measured, indent=2))
    )
    return measured


def verify_on_device(out: Path, device: Device, cfg, recorded, log: Callable[[str], None] = print) -> tuple:
    """The build's gate with every device runtime's answers given by `device`; the verdicts (failed ones included).
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
    runtimes = shipped_runtimes(out / Stage.EXPORT, None)
    with bundle_for(out, runtimes, log) as (bundle_dir, bundle):
        log(f"{device.label}: {len(items)} prompts for {', '.join(runtimes)}")
        result = run_job(
            device,
            bundle_dir,
            bundle,
            "answer",
            runtimes,
            [Prompt(item.image(), item.prompt) for item in items],
            cfg.max_new_tokens,
            log=log,
        )
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

    write_device_results(out, device, {**device.facts(), "python": result["python"]}, write)
    for v in verdicts:
        log(f"{v.artifact} on {device.label}: {'pass' if v.passed else 'FAIL'}")
    return verdicts
