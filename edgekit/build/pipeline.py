"""`edgekit build`: from a base model to verified edge artifacts, top to bottom.

    01_scan      the original model at its default exit layer, at K and at a few more layers
    02_align     L-PPO (or the SFT baseline) at exit layer K; skipped by `--method none`
    03_truncate  the aligned model cut to K vision blocks: a plain Hugging Face checkpoint
    04_export    ONNX and GGUF artifacts for the target, with their own manifest
    05_safety    the aligned model scanned again; every artifact answers the eval split in its own runtime; the gate
    06_bench     latency and peak memory of each runtime, each in a fresh process
    then         report.md / report.html, the model card README.md, and manifest.json over every file

Each stage runs through `edgekit.build.stages.Stages`, which reuses it when its inputs are unchanged, so a killed
build picks up where it stopped; alignment also resumes mid-stage from its own checkpoints. A failed gate marks the
artifact failed in the manifest and ends the build with exit code 3.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit.build.config import BuildConfig
from edgekit.build.stages import BUILD_MARK, Stage, Stages, clean_partial, source_identity
from edgekit.errors import UserError


@dataclass(frozen=True)
class BuildResult:
    """What a build that passed its gate returns (a failed gate raises GateFailure)."""

    output: Path
    reused: tuple[str, ...]  # stages whose inputs were unchanged
    verdicts: tuple  # edgekit.safety.gate.Verdict per artifact, every one passed


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> BuildResult:
    from edgekit.align.rewards import reward_identity
    from edgekit.build import artifact_stages, model_stages
    from edgekit.build.devices import DEVICES_DIR
    from edgekit.build.report import write_report
    from edgekit.devices.profiles import load_profile
    from edgekit.model.demo import demo_model_path
    from edgekit.safety.gate import raise_if_failed, read_gate
    from edgekit.safety.judges import make_judge
    from edgekit.safety.limits import floor_baseline, gate_limits, limits_json
    from edgekit.safety.suite import builtin_suite

    out = Path(cfg.output).resolve()
    profile = load_profile(cfg.target)
    make_judge(cfg.judge)  # an unknown judge is a user error before anything runs
    num_layers, default_layer = check_request(cfg, profile, log)
    out.mkdir(parents=True, exist_ok=True)
    clean_partial(out)
    (out / BUILD_MARK).write_text(json.dumps(cfg.as_json(), indent=2))
    source = cfg.model or str(demo_model_path(log=log))
    if num_layers is None:  # the demo model: known only once it exists
        num_layers, default_layer = check_request(BuildConfig(**{**cfg.as_json(), "model": source}), profile, log)
    layers = scan_layers(cfg, num_layers, default_layer)
    items = builtin_suite().select("eval", limit_per_kind=cfg.limit_per_kind)
    measure = {
        "suite": "builtin/eval",
        "limit_per_kind": cfg.limit_per_kind,
        "judge": cfg.judge,
        "max_new_tokens": cfg.max_new_tokens,
        "dtype": cfg.dtype,
    }
    limits = gate_limits(profile.gates, cfg.gates, profile.utility_floor)
    floor = floor_baseline(cfg.gates, profile.utility_floor)
    stages = Stages(out, log)
    k = cfg.exit_layer

    model_id = source_identity(source, cfg.revision)
    stages.run(
        Stage.SCAN,
        {"model": model_id, "layers": layers, **measure},
        lambda f: model_stages.write_scan(f, source, cfg, items, layers, default_layer),
    )
    if cfg.method == "none":  # the early exit as it comes, unaligned: what the gate is there to catch
        shutil.rmtree(out / Stage.ALIGN, ignore_errors=True)  # an earlier build's alignment is not this build's
        aligned, aligned_id = Path(source), model_id
    else:
        stages.run(
            Stage.ALIGN,
            {
                "model": model_id,
                "exit_layer": k,
                "method": cfg.method,
                "dtype": cfg.dtype,
                "reward": reward_identity(cfg.reward),
                "align": cfg.align,
            },
            lambda f: model_stages.write_align(f, source, cfg),
        )
        aligned, aligned_id = out / Stage.ALIGN / "merged", stages.output_hash(Stage.ALIGN)
    stages.run(
        Stage.TRUNCATE,
        {"aligned": aligned_id, "exit_layer": k},
        lambda f: model_stages.write_truncate(f, aligned, cfg),
    )
    stages.run(
        Stage.EXPORT,
        {
            "model": stages.output_hash(Stage.TRUNCATE),
            "exit_layer": k,
            "profile": profile,
            "formats": cfg.formats,
            "onnx_quantization": cfg.onnx_quantization,
        },
        lambda f: model_stages.write_export(f, out / Stage.TRUNCATE, cfg, profile),
    )
    if Stage.EXPORT not in stages.reused:  # results from devices measured artifacts that are gone
        shutil.rmtree(out / DEVICES_DIR, ignore_errors=True)
    stages.run(
        Stage.SAFETY,
        {
            "original": stages.output_hash(Stage.SCAN),
            "aligned": aligned_id,
            "model": stages.output_hash(Stage.TRUNCATE),
            "artifacts": stages.output_hash(Stage.EXPORT),
            "layers": layers,
            "limits": limits_json(limits),
            "floor": floor,
            **measure,
        },
        lambda f: artifact_stages.write_safety(f, out, aligned, cfg, items, layers, default_layer, limits, floor),
    )
    stages.run(
        Stage.BENCH,
        {
            "model": stages.output_hash(Stage.TRUNCATE),
            "artifacts": stages.output_hash(Stage.EXPORT),
            "prompts": cfg.bench_prompts,
            "max_new_tokens": cfg.max_new_tokens,
        },
        lambda f: artifact_stages.write_bench(f, out, cfg),
    )

    verdicts = read_gate(out / Stage.SAFETY).verdicts
    write_report(out, cfg, profile, source, default_layer, verdicts)
    raise_if_failed(verdicts)
    return BuildResult(out, tuple(stages.reused), verdicts)


def check_request(cfg: BuildConfig, profile, log: Callable[[str], None] = print) -> tuple[int | None, int | None]:
    """Everything cheap, before any weight is read or trained: the model's family and layers, the export request
    (logging the ONNX scheme where the target's default is changed to fit its budget), the align settings, the output
    folder. Returns (L, default layer), or (None, None) for the untrained demo."""
    from edgekit.align.config import LPPOConfig, check_layers
    from edgekit.align.rewards import check_reward
    from edgekit.export.artifacts import check_request as check_export
    from edgekit.export.artifacts import parse_formats
    from edgekit.model.families import family_for
    from edgekit.model.loading import load_config
    from edgekit.outputs import check_output_dir

    out = Path(cfg.output)
    if out.exists() and not (out / BUILD_MARK).is_file():
        check_output_dir(out)  # a folder that is not a build must be empty
    if cfg.method == "lppo":
        check_reward(cfg.reward)
    try:
        align = LPPOConfig(exit_layer=cfg.exit_layer, **cfg.align)
    except TypeError as err:
        raise UserError(f"[align]: {err}") from None
    if cfg.model is None:
        return None, None
    config = load_config(cfg.model, revision=cfg.revision)
    family = family_for(config)
    num_layers = family.num_layers(config)
    formats = parse_formats(cfg.formats) if cfg.formats else profile.formats
    plan = check_export(family, num_layers, cfg.exit_layer, profile, formats, cfg.onnx_quantization, config)
    if plan.why:
        log(plan.why)
    check_layers(align, num_layers)
    return num_layers, family.default_exit(config)


def scan_layers(cfg: BuildConfig, num_layers: int, default_layer: int) -> list[int]:
    from edgekit.safety.scan import parse_layers

    if cfg.scan_layers != "auto":
        return sorted(set(parse_layers(cfg.scan_layers, num_layers)) | {cfg.exit_layer, default_layer})
    return sorted({*range(4, num_layers + 1, 4), 1, cfg.exit_layer, default_layer})
