"""What each `edgekit` command does: thin calls into the stages, after `preflight` has checked everything cheap.

Every command that takes MODEL treats an omitted MODEL the same way: the embedded demo model (trained on first use,
then cached). Checks that need no model (output folder, target, flags) run before the demo model is trained.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

from edgekit.errors import UserError


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def preflight(args, *, exit_layer: int | None = None, layers: str | None = None, check: Callable[[int], object] = id):
    """MODEL's config and family, read before any weight is, with `exit_layer`, a `layers` spec ('all', '1-24',
    '1,4,8-16') and `check(L)` checked against its tower of L layers; returns (config, family, parsed layers or None).
    Without MODEL, the embedded demo model's: trained here on first use, after the flags are checked against its
    known depth, so call this after the checks that need no model."""
    from edgekit.model.demo import DEMO_SIZES, demo_model_path
    from edgekit.model.families import family_for
    from edgekit.model.loading import load_config
    from edgekit.model.surgery import check_exit_layer
    from edgekit.safety.scan import parse_layers

    def check_all(num_layers: int) -> list[int] | None:
        if exit_layer is not None:
            check_exit_layer(exit_layer, num_layers)
        check(num_layers)
        return parse_layers(layers, num_layers) if layers is not None else None

    if args.model is None:
        check_all(DEMO_SIZES.vision_layers)  # a bad flag fails now, not after minutes of training
        args.model = str(demo_model_path(log=_stderr))
    config = load_config(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    family = family_for(config)
    return config, family, check_all(family.num_layers(config))


def _load(args, lazy: bool = False):
    from edgekit.model.loading import load

    return load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
        lazy=lazy,
    )


def cmd_inspect(args) -> None:
    from edgekit.model.sizes import format_sizes, model_sizes

    config, _, _ = preflight(args, exit_layer=args.exit_layer)
    sizes = model_sizes(config, args.exit_layer)
    print(json.dumps(asdict(sizes), indent=2) if args.json else format_sizes(sizes))


def cmd_truncate(args) -> None:
    from edgekit.model.sizes import model_sizes
    from edgekit.model.surgery import truncate_checkpoint
    from edgekit.outputs import check_output_dir
    from edgekit.units import human_bytes

    check_output_dir(args.output, args.overwrite)
    config, _, _ = preflight(args, exit_layer=args.exit_layer)
    sizes = model_sizes(config, args.exit_layer)
    out = truncate_checkpoint(_load(args), args.exit_layer, args.output, overwrite=args.overwrite)
    print(
        f"wrote {out}: vision tower cut to {args.exit_layer} of {sizes.num_layers} blocks, "
        f"{sizes.saved_params:,} parameters ({human_bytes(sizes.saved_bytes)}) removed"
    )


def cmd_tiny(args) -> None:
    from edgekit.model.tiny import build_tiny, save_tiny
    from edgekit.outputs import atomic_dir

    with atomic_dir(args.output, args.overwrite) as tmp:
        save_tiny(*build_tiny(args.family, seed=args.seed), tmp)
    print(f"wrote a tiny random {args.family} checkpoint to {args.output}")


def cmd_targets(args) -> None:
    from edgekit.devices.profiles import list_profiles
    from edgekit.units import human_bytes

    rows = [
        ("target", "kind", "memory budget", "formats", "onnx", "gguf lm", "mmproj", "gates asr/over-refusal/utility")
    ]
    for p in list_profiles():
        g = p.gates
        rows.append(
            (
                p.name + (" (default)" if p.default else ""),
                p.kind,
                human_bytes(p.memory_budget_bytes, "decimal"),
                ",".join(p.formats),
                "/".join(p.onnx_options).replace(p.onnx_quantization, p.onnx_quantization + "*", 1),
                p.gguf_quantization,
                p.mmproj_quantization,
                f"+{g.asr:g} / +{g.over_refusal:g} / -{g.utility:g}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(
        "--target takes a name, a kind (jetson, phone: its default) or a profile .toml; * = default ONNX scheme, the "
        "others in order (a model whose default set is over the budget gets the next that fits); "
        "gates in points: ASR versus the original model at its default exit layer, over-refusal and utility versus "
        "the original model at K (see README: the gate)"
    )


def cmd_export(args) -> None:
    import logging

    from edgekit.devices.profiles import load_profile
    from edgekit.export.artifacts import check_request, export_artifacts, parse_formats
    from edgekit.outputs import check_output_dir
    from edgekit.units import human_bytes

    profile = load_profile(args.target)
    formats = parse_formats(args.formats) if args.formats else profile.formats
    check_output_dir(args.output, args.overwrite)
    config, family, _ = preflight(args, exit_layer=args.exit_layer)
    plan = check_request(
        family, family.num_layers(config), args.exit_layer, profile, formats, args.onnx_quantization, config
    )
    if plan.why:
        print(f"edgekit: {plan.why}", file=sys.stderr)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger
    result = export_artifacts(
        _load(args, lazy=True),  # the weights load when a writer needs them in memory (the GGUF streams them)
        args.exit_layer,
        profile,
        args.output,
        formats,
        args.overwrite,
        onnx_quantization=args.onnx_quantization,
    )
    largest = result.largest_set
    size, budget = (human_bytes(n, "decimal") for n in (largest.bytes, profile.memory_budget_bytes))
    print(
        f"wrote {result.folder}: exit layer {result.exit_layer}, target {profile.name}, {len(result.files)} files; "
        f"largest runtime set {largest.name} {size} of {budget} budget"
    )


def cmd_scan(args) -> None:
    from tqdm import tqdm

    from edgekit.outputs import atomic_dir, check_output_dir
    from edgekit.safety.judges import make_judge
    from edgekit.safety.loaders import load_suite
    from edgekit.safety.report import write_scan_report
    from edgekit.safety.scan import scan
    from edgekit.safety.suite import builtin_suite

    judge = make_judge(args.judge)
    suite = builtin_suite() if args.suite == "builtin" else load_suite(args.suite, images=args.images)
    items = suite.select("eval" if args.suite == "builtin" else None, limit_per_kind=args.limit_per_kind)
    check_output_dir(args.output, args.overwrite)
    config, family, layers = preflight(args, layers=args.layers)
    loaded = _load(args)
    with tqdm(total=len(items), desc=f"scan {len(layers)} layers", unit="item", file=sys.stderr) as bar:
        result = scan(
            loaded,
            items,
            layers,
            judge,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=bar.update,
        )
    with atomic_dir(args.output, args.overwrite) as tmp:
        write_scan_report(
            result, tmp, model=args.model, suite=suite.name, judge=args.judge, default_layer=family.default_exit(config)
        )
    print((Path(args.output) / "scan.md").read_text())
    print(
        f"wrote {args.output}/scan.json, scan.md, scan.png ({result.vision_forwards} vision-tower forwards for "
        f"{result.images} images x {len(layers)} layers)"
    )


def cmd_judge(args) -> None:
    from edgekit.safety.judges import make_judge
    from edgekit.safety.loaders import read_pairs

    judge = make_judge(args.judge)
    prompts, responses = read_pairs(args.file)
    for verdict in judge.judge(prompts, responses):
        row = {"label": verdict.label, "score": round(float(verdict.score), 4)}
        print(json.dumps(row if verdict.unsafe is None else row | {"unsafe": verdict.unsafe}))


def cmd_align(args) -> None:
    from accelerate import PartialState

    from edgekit.align.checkpoint import check_output_and_checkpoint
    from edgekit.align.config import LPPOConfig
    from edgekit.align.rewards import check_reward

    given = {f.name: getattr(args, f.name) for f in LPPOConfig.flags() if getattr(args, f.name) is not None}
    make_config = partial(LPPOConfig, exit_layer=args.exit_layer, exit_layers=args.exit_layers, **given)
    if args.method == "lppo":
        check_reward(args.reward, args.harm_penalty)
    elif args.harm_penalty is not None:
        raise UserError("--harm-penalty shapes the L-PPO reward; --method sft has no reward")
    check_output_and_checkpoint(args.output, resume=args.resume, overwrite=args.overwrite)
    # Under `accelerate launch` every process runs this command: each trains on its own device (its GPU with
    # --device cuda, the CPU with --device cpu), and the main one trains the demo model if needed and reports.
    launch = PartialState(cpu=args.device.split(":")[0] == "cpu")
    if launch.num_processes > 1:
        args.device = str(launch.device)
    try:
        _align_here(args, launch, make_config)
    finally:
        launch.destroy_process_group()
    if launch.num_processes > 1:
        _leave_without_teardown()


def _leave_without_teardown() -> None:
    """End a launched process that has written and reported everything, skipping the interpreter's teardown.

    DTensor's sharding caches keep the gloo process group alive past `destroy_process_group`, so its worker threads are
    still running when the interpreter tears down, and now and then that aborts the exit (SIGABRT, 'terminate called
    without an active exception') after a run that succeeded."""
    import os

    from edgekit.outputs import stop_if_terminated

    stop_if_terminated()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _align_here(args, launch, make_config) -> None:
    from edgekit.align.config import check_layers
    from edgekit.align.rewards import make_reward
    from edgekit.align.trainer import align

    with launch.main_process_first():
        preflight(args, exit_layer=args.exit_layer, check=lambda num_layers: check_layers(make_config(), num_layers))
    config = make_config()
    loaded = _load(args)
    reward = None
    if args.method == "lppo":
        reward = make_reward(args.reward, device=args.device, harm_penalty=args.harm_penalty)
    result = align(
        loaded,
        args.output,
        config,
        reward,
        method=args.method,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if not launch.is_main_process:
        return
    layers = f"{config.exit_layers[0]}-{config.exit_layers[1]}" if config.exit_layers else str(config.exit_layer)
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from is not None else ""
    last = ", ".join(f"{k} {v:.4g}" for k, v in result.last.items() if k not in ("step", "exit_layer"))
    print(
        f"wrote {result.output}: {result.method} at exit layer {layers}, {result.steps} steps{resumed}; last step: "
        f"{last}; merged/ is a plain Hugging Face checkpoint, adapter/ the LoRA adapter"
    )


def cmd_build(args) -> None:
    from edgekit.build.config import resolve
    from edgekit.build.pipeline import build

    given = {
        name: getattr(args, name)
        for name in (
            "model",
            "revision",
            "exit_layer",
            "target",
            "output",
            "limit_per_kind",
            "scan_layers",
            "method",
            "reward",
            "device",
            "dtype",
        )
    }
    given["align"] = {name: getattr(args, name) for name in ("steps", "batch", "lr") if getattr(args, name) is not None}
    if args.formats:
        given["formats"] = tuple(args.formats.split(","))
    cfg = resolve(given, args.config)
    report = Path(cfg.output) / "report.md"
    stamp = lambda: report.stat().st_mtime_ns if report.is_file() else None  # noqa: E731
    before = stamp()
    try:
        result = build(cfg, log=lambda line: _stderr(f"edgekit build: {line}"))
    finally:
        if stamp() not in (None, before):  # this run's report (a gate failure writes one too), not an earlier run's
            print(report.read_text())
    print(
        f"wrote {result.output}: gate passed for {len(result.verdicts)} artifacts"
        + (f"; reused {', '.join(result.reused)}" if result.reused else "")
    )


def _device(args):
    from edgekit.devices.runners import parse_device

    return parse_device(args.device, python=args.python, root=args.remote_dir)


def cmd_verify(args) -> None:
    from edgekit.build.verify import verify

    device = _device(args) if args.device else None
    if args.llama_bin and not device:
        raise UserError("--llama-bin runs llama.cpp's tools on a device: give --device too")
    verdicts = verify(args.folder, device=device, llama_bin=args.llama_bin, log=_stderr)
    where = f" on {device.label}" if device else ""
    print(f"{args.folder}: every file matches its manifest and {len(verdicts)} artifacts pass the gate{where} again")


def cmd_bundle(args) -> None:
    from edgekit.devices.bundle import make_bundle

    make_bundle(args.folder, args.output, args.runtimes, overwrite=args.overwrite)


def cmd_bench(args) -> None:
    from edgekit.build.devices import bench_on_device
    from edgekit.build.report import bench_table, describe_device

    if args.prompts < 1 or args.max_new_tokens < 2:
        raise UserError("--prompts must be at least 1 and --max-new-tokens at least 2")
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    measured = bench_on_device(
        folder, _device(args), args.runtimes, args.prompts, args.max_new_tokens, args.llama_bin, log=_stderr
    )
    if args.json:
        print(json.dumps(measured, indent=2))
        return
    print(f"{describe_device(measured['device'])}\n")
    print(bench_table(measured["rows"]))
