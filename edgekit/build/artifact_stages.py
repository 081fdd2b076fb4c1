"""What the artifact stages write: 05_safety (the aligned model scanned again, then every artifact through the gate)
and 06_bench (each runtime's latency and peak memory, each in a fresh process).

An artifact is named after the runtime that runs it: `pytorch` is the truncated checkpoint in 03_truncate; the others
(`onnx`, `gguf`, `hybrid`, `ortgenai`) are the runtime sets the export's manifest in 04_export lists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.build.config import BuildConfig
from edgekit.build.model_stages import load_model, scan_into
from edgekit.build.stages import Stage
from edgekit.errors import first_line
from edgekit.export.manifest import MANIFEST_FILE
from edgekit.machine import release_freed_memory
from edgekit.outputs import atomic_dir
from edgekit.safety.limits import ALIGNED, EARLY_EXIT, FLOOR, ORIGINAL, Limits

if TYPE_CHECKING:
    from edgekit.safety.gate import Evaluated

PYTORCH = "pytorch"  # the truncated checkpoint, run by transformers
ALIGNED_SCAN = "aligned_scan"  # the aligned model's scan, inside 05_safety
BENCH_FILE = "bench.json"


def artifact_names(out: Path) -> tuple[str, ...]:
    """The truncated checkpoint, then each runtime set of the export."""
    manifest = json.loads((out / Stage.EXPORT / MANIFEST_FILE).read_text())
    return (PYTORCH, *manifest["memory"]["sets"])


def evaluate_artifacts(out: Path, cfg: BuildConfig, items) -> dict[str, Evaluated]:
    """Each artifact's answers to `items`, in its own runtime."""
    from tqdm import tqdm

    from edgekit.devices.runtime import open_runtime
    from edgekit.safety.gate import Evaluated, answer_items, metric_values
    from edgekit.safety.judges import make_judge
    from edgekit.safety.scan import scan

    judge = make_judge(cfg.judge)
    results = {}
    for name in artifact_names(out):
        release_freed_memory()  # one model in memory at a time: what the last one held goes before this loads
        try:
            with tqdm(total=len(items), desc=f"safety {name}", unit="item", file=sys.stderr) as bar:
                if name == PYTORCH:  # batched, as the baselines were scanned
                    layer = scan(
                        load_model(out / Stage.TRUNCATE, cfg),
                        items,
                        [cfg.exit_layer],
                        judge,
                        max_new_tokens=cfg.max_new_tokens,
                        progress=bar.update,
                    ).layers[0]
                else:
                    layer = answer_items(
                        open_runtime(name, out / Stage.EXPORT),
                        items,
                        judge,
                        cfg.exit_layer,
                        cfg.max_new_tokens,
                        progress=bar.update,
                    )
            results[name] = Evaluated(metric_values(layer), list(layer.answers), None)
        except Exception as err:  # fail closed: whatever broke, this artifact does not pass
            results[name] = Evaluated(
                None, [], type(err).__name__ + (f": {first_line(err)}" if str(err).strip() else "")
            )
    return results


def write_safety(
    folder: Path,
    out: Path,
    aligned: Path,
    cfg: BuildConfig,
    items,
    layers,
    default_layer: int,
    limits: dict[str, Limits],
    floor: dict | None,
) -> bool:
    """The aligned model's scan (the 'after' plot; with `--method none`, the original model's again), then every
    artifact through the gate against the baselines `limits` names (`floor`: the utility floor's, if any).
    Unfinished (rerun next time) when a runtime or the judge failed."""
    from edgekit.safety.gate import GateRecord, gate_verdicts, metric_values, write_answers, write_gate
    from edgekit.safety.report import SCAN_FILE
    from edgekit.safety.scan import METRICS

    original = json.loads((out / Stage.SCAN / SCAN_FILE).read_text())["layers"]
    with atomic_dir(folder, overwrite=True) as tmp:
        (tmp / ALIGNED_SCAN).mkdir()
        after = scan_into(
            tmp / ALIGNED_SCAN,
            load_model(aligned, cfg),
            cfg,
            items,
            layers,
            default_layer,
            "aligned",
        )
        baselines = {
            ORIGINAL: next({m: r[m] for m in METRICS} for r in original if r["layer"] == default_layer),
            EARLY_EXIT: next({m: r[m] for m in METRICS} for r in original if r["layer"] == cfg.exit_layer),
            ALIGNED: next(metric_values(r) for r in after.layers if r.layer == cfg.exit_layer),
            **({FLOOR: floor} if floor else {}),
        }
        evaluated = evaluate_artifacts(out, cfg, items)
        verdicts = gate_verdicts(evaluated, baselines, limits, aligned_artifact=PYTORCH)
        for name, result in evaluated.items():
            write_answers(tmp / f"answers_{name}.jsonl", result.answers)
        write_gate(tmp, GateRecord(baselines, limits, verdicts))
    return not any(v.error for v in verdicts)


def write_bench(folder: Path, out: Path, cfg: BuildConfig) -> None:
    from edgekit.devices.bench import bench_in_subprocess

    rows = {}
    for name in artifact_names(out):
        where = out / (Stage.TRUNCATE if name == PYTORCH else Stage.EXPORT)
        try:
            rows[name] = bench_in_subprocess(
                name,
                where,
                prompts=cfg.bench_prompts,
                max_new_tokens=cfg.max_new_tokens,
                exit_layer=cfg.exit_layer,
                dtype=cfg.dtype,  # the precision the gate ran the checkpoint in
            )
        except RuntimeError as err:  # a benchmark is a measurement, not a gate: record it and go on
            rows[name] = {"runtime": name, "error": str(err)}
    with atomic_dir(folder, overwrite=True) as tmp:
        (tmp / BENCH_FILE).write_text(json.dumps(rows, indent=2))
