"""The `edgekit` command: thin commands over the stage functions. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from edgekit.errors import GateFailure, UserError
from edgekit.model.tiny import TINY_FAMILIES

EPILOG = "Exit layer k (1..L) = output of vision block k = HF hidden_states[k]; LLaVA-1.5's default is 23 of 24."


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        raise UserError(f"{message} (see: {self.prog} --help)")


def _exit_layer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"exit layer must be an integer, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None, help="hub id (owner/name) or local model folder")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16 or bfloat16")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--trust-remote-code", action="store_true", help="run the repo's own Python code (off by default)")


def _load(args):
    from edgekit.model.loading import load

    return load(
        args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    )  # fmt: skip


def cmd_inspect(args) -> None:
    from edgekit.model.loading import load_config
    from edgekit.model.sizes import format_sizes, model_sizes

    config = load_config(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    sizes = model_sizes(config, args.exit_layer)
    print(json.dumps(asdict(sizes), indent=2) if args.json else format_sizes(sizes))


def cmd_truncate(args) -> None:
    from edgekit.model.loading import load_config
    from edgekit.outputs import check_output_dir
    from edgekit.model.sizes import human_bytes, model_sizes
    from edgekit.model.surgery import truncate_checkpoint

    # Check everything cheap before reading weights: the layer against the config, the output folder.
    config = load_config(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    sizes = model_sizes(config, args.exit_layer)
    check_output_dir(args.output, args.overwrite)
    out = truncate_checkpoint(_load(args), args.exit_layer, args.output, overwrite=args.overwrite)
    print(
        f"wrote {out}: vision tower cut to {args.exit_layer} of {sizes.num_layers} blocks, "
        f"{sizes.saved_params:,} parameters ({human_bytes(sizes.saved_bytes)}) removed"
    )


def cmd_tiny(args) -> None:
    from edgekit.outputs import atomic_dir
    from edgekit.model.tiny import build_tiny, save_tiny

    with atomic_dir(args.output, args.overwrite) as tmp:
        save_tiny(*build_tiny(args.family, seed=args.seed), tmp)
    print(f"wrote a tiny random {args.family} checkpoint to {args.output}")


def cmd_targets(args) -> None:
    from edgekit.devices.profiles import list_profiles
    from edgekit.export.artifacts import human

    rows = [("target", "kind", "memory budget", "formats", "onnx", "gguf lm", "mmproj", "gates asr/over-refusal/utility")]
    for p in list_profiles():
        g = p.gates
        rows.append((
            p.name + (" (default)" if p.default else ""), p.kind, human(p.memory_budget_bytes), ",".join(p.formats),
            "/".join(p.onnx_options).replace(p.onnx_quantization, p.onnx_quantization + "*", 1), p.gguf_quantization,
            p.mmproj_quantization,
            f"+{g.max_asr_increase_points:g} / +{g.max_over_refusal_increase_points:g} / -{g.max_utility_drop_points:g}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("--target takes a name, a kind (jetson, phone: its default) or a profile .toml; * = default ONNX scheme; "
          "gates in points versus the original model at its default exit layer")


def cmd_export(args) -> None:
    import logging

    from edgekit.devices.profiles import load_profile
    from edgekit.export.artifacts import check_output, check_request, export_artifacts, human, parse_formats
    from edgekit.model.families import family_for
    from edgekit.model.loading import load_config

    # Check everything cheap before reading weights: target, formats, the layer against the config, the output.
    profile = load_profile(args.target)
    formats = parse_formats(args.formats) if args.formats else profile.formats
    config = load_config(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    family = family_for(config)
    check_request(family, family.num_layers(config), args.exit_layer, profile, formats, args.onnx_quantization)
    check_output(args.output, args.overwrite)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger
    result = export_artifacts(_load(args), args.exit_layer, profile, args.output, formats, args.overwrite,
                              onnx_quantization=args.onnx_quantization)  # fmt: skip
    largest = result.largest_set
    print(f"wrote {result.folder}: exit layer {result.exit_layer}, target {profile.name}, {len(result.files)} files; "
          f"largest runtime set {largest.name} {human(largest.bytes)} of {human(profile.memory_budget_bytes)} budget")
    for note in result.notes:
        print(f"note: {note}")


def _model_or_demo(args) -> str:
    from edgekit.model.demo import demo_model_path

    return args.model or str(demo_model_path(log=lambda line: print(line, file=sys.stderr)))


def cmd_scan(args) -> None:
    from tqdm import tqdm

    from edgekit.model.families import family_for
    from edgekit.model.loading import load_config
    from edgekit.outputs import atomic_dir, check_output_dir
    from edgekit.safety.report import write_scan_report
    from edgekit.safety.judges import make_judge
    from edgekit.safety.loaders import load_suite
    from edgekit.safety.scan import parse_layers, scan
    from edgekit.safety.suite import builtin_suite

    judge = make_judge(args.judge)
    suite = builtin_suite() if args.suite == "builtin" else load_suite(args.suite, images=args.images)
    items = suite.select("eval" if args.suite == "builtin" else None, limit_per_kind=args.limit_per_kind)
    if args.model:  # check the layers against the config before any weight is read (image paths: by the loaders)
        config = load_config(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
        parse_layers(args.layers, family_for(config).num_layers(config))
    check_output_dir(args.output, args.overwrite)
    args.model = _model_or_demo(args)
    loaded = _load(args)
    layers = parse_layers(args.layers, loaded.family.num_layers(loaded.model.config))
    with tqdm(total=len(items), desc=f"scan {len(layers)} layers", unit="item", file=sys.stderr) as bar:
        result = scan(loaded, items, layers, judge, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      progress=bar.update)  # fmt: skip
    with atomic_dir(args.output, args.overwrite) as tmp:
        write_scan_report(result, tmp, model=args.model, suite=suite.name, judge=args.judge,
                          default_layer=loaded.family.default_exit(loaded.model.config))  # fmt: skip
    print((Path(args.output) / "scan.md").read_text())
    print(f"wrote {args.output}/scan.json, scan.md, scan.png ({result.vision_forwards} vision-tower forwards for "
          f"{result.images} images x {len(layers)} layers)")  # fmt: skip


def cmd_judge(args) -> None:
    from edgekit.safety.judges import make_judge
    from edgekit.safety.loaders import read_pairs

    judge = make_judge(args.judge)
    prompts, responses = read_pairs(args.file)
    for verdict in judge.judge(prompts, responses):
        row = {"label": verdict.label, "score": round(float(verdict.score), 4)}
        print(json.dumps(row if verdict.unsafe is None else row | {"unsafe": verdict.unsafe}))


def _exit_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range A-B of exit layers, e.g. 3-5, got {text!r}") from None


JUDGE_HELP = ("refusal (offline, default), keyword (baseline) or llama-guard[:MODEL] (Llama Guard 3 decides attack "
              "success; a folder or hub id, default meta-llama/Llama-Guard-3-8B)")  # fmt: skip
ALIGN_FLAGS = ("steps", "batch", "minibatch", "ppo_epochs", "lr", "max_new_tokens", "temperature", "top_k", "kl_init",
               "kl_target", "checkpoint_every", "seed", "recompute_activations")  # fmt: skip


def cmd_align(args) -> None:
    from accelerate import PartialState

    from edgekit.align.lppo import LPPOConfig, align, check_layers, check_output
    from edgekit.align.rewards import check_reward, make_reward
    from edgekit.model.families import family_for
    from edgekit.model.loading import load_config
    from edgekit.model.surgery import check_exit_layer

    # Check everything cheap before reading weights: the layers against the config, the settings, the reward
    # source, the output folder (and a checkpoint to resume).
    num_layers = None
    if args.model:
        model_config = load_config(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
        num_layers = family_for(model_config).num_layers(model_config)
        check_exit_layer(args.exit_layer, num_layers)
    given = {name: getattr(args, name) for name in ALIGN_FLAGS if getattr(args, name) is not None}
    config = LPPOConfig(exit_layer=args.exit_layer, exit_layers=args.exit_layers, **given)
    if num_layers is not None:
        check_layers(config, num_layers)
    if args.method == "lppo":
        check_reward(args.reward, args.harm_penalty)
    elif args.harm_penalty is not None:
        raise UserError("--harm-penalty shapes the L-PPO reward; --method sft has no reward")
    check_output(args.output, resume=args.resume, overwrite=args.overwrite)
    # Under `accelerate launch` every process runs this command: each trains on its own device (its GPU with
    # --device cuda, the CPU with --device cpu), and the main one trains the demo model if needed and reports.
    launch = PartialState(cpu=args.device.split(":")[0] == "cpu")
    if launch.num_processes > 1:
        args.device = str(launch.device)
    with launch.main_process_first():
        args.model = _model_or_demo(args)
    loaded = _load(args)
    reward = None
    if args.method == "lppo":
        reward = make_reward(args.reward, device=args.device, harm_penalty=args.harm_penalty)
    result = align(loaded, args.output, config, reward, method=args.method, resume=args.resume,
                   overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
    if not launch.is_main_process:
        return
    layers = f"{config.exit_layers[0]}-{config.exit_layers[1]}" if config.exit_layers else str(config.exit_layer)
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from is not None else ""
    last = ", ".join(f"{k} {v:.4g}" for k, v in result.last.items() if k not in ("step", "exit_layer"))
    print(f"wrote {result.output}: {result.method} at exit layer {layers}, {result.steps} steps{resumed}; last step: "
          f"{last}; merged/ is a plain Hugging Face checkpoint, adapter/ the LoRA adapter")  # fmt: skip


def cmd_build(args) -> None:
    from edgekit.build.config import resolve
    from edgekit.build.pipeline import build

    given = {name: getattr(args, name) for name in ("model", "revision", "exit_layer", "target", "output",
                                                      "limit_per_kind", "scan_layers", "method", "reward", "device")}
    given["align"] = {name: getattr(args, name) for name in ("steps", "batch", "lr") if getattr(args, name) is not None}
    if args.formats:
        given["formats"] = tuple(args.formats.split(","))
    cfg = resolve(given, args.config)
    log = lambda line: print(f"edgekit build: {line}", file=sys.stderr)  # noqa: E731
    report = Path(cfg.output) / "report.md"
    stamp = lambda: report.stat().st_mtime_ns if report.is_file() else None  # noqa: E731
    before = stamp()
    try:
        result = build(cfg, log=log)
    finally:
        if stamp() not in (None, before):  # this run's report (a gate failure writes one too), not an earlier run's
            print(report.read_text())
    print(f"wrote {result.output}: gate passed for {len(result.verdicts)} artifacts"
          + (f"; reused {', '.join(result.reused)}" if result.reused else ""))


def cmd_verify(args) -> None:
    from edgekit.build.pipeline import verify

    verdicts = verify(args.folder, log=lambda line: print(line, file=sys.stderr))
    print(f"{args.folder}: every file matches its manifest and {len(verdicts)} artifacts pass the gate again")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgekit",
        description="Ship vision-language models with an early-exited image encoder to phones and Jetson boards, "
        "with their safety re-aligned at the exit layer and checked on every artifact.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="family, exitable layers, parameters and bytes per part", epilog=EPILOG)
    _add_model_args(p)
    p.add_argument("--exit-layer", type=_exit_layer, help="also show what truncating at this layer saves")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "truncate",
        help="cut the vision tower after block K and save a plain Hugging Face checkpoint",
        description="Physically remove vision blocks K+1..L and rewrite the config, so the saved checkpoint loads "
        "with plain transformers (no edgekit import) and computes what the original computes when exiting at K.",
        epilog=EPILOG,
    )
    _add_model_args(p)
    p.add_argument("--exit-layer", type=_exit_layer, required=True, metavar="K", help="keep vision blocks 1..K")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_truncate)

    p = sub.add_parser(
        "tiny",
        help="write a tiny random checkpoint of a family, in the real hub layout (for tests and CI)",
        description="Build a tiny random model (full vision depth, tiny width) with a locally trained tokenizer, "
        "image processor and chat template, saved exactly as the family's hub repos are laid out.",
    )
    p.add_argument("family", choices=TINY_FAMILIES, help="config.model_type of the family")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("targets", help="list the target device profiles")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser(
        "export",
        help="cut the vision tower at K and write a target's ONNX / GGUF artifacts with a manifest",
        description="Cut the vision tower after block K, export ONNX graphs (quantized for the target) and GGUF files "
        "(language model + mmproj for llama.cpp), write manifest.json with sha256 of every file, and check the "
        "artifacts fit the target's memory budget. The output folder appears whole or not at all.",
        epilog=EPILOG,
    )
    _add_model_args(p)
    p.set_defaults(dtype="float32")  # graphs are exported in fp32, then quantized for the target
    p.add_argument("--exit-layer", type=_exit_layer, required=True, metavar="K", help="keep vision blocks 1..K")
    p.add_argument("--target", required=True, metavar="T", help="profile name, jetson, phone, or a profile .toml")
    p.add_argument("--formats", metavar="LIST", help="comma-separated: onnx,gguf (default: the target's formats)")
    p.add_argument("--onnx-quantization", metavar="SCHEME", help="one of the target's ONNX options (edgekit targets)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "scan",
        help="measure ASR, over-refusal and utility at every exit layer (the ICET scan)",
        description="Answer the safety suite at each exit layer and judge the answers. One vision-tower forward per "
        "batch of images gives every layer's features; answers are batched greedy generations. Writes scan.json, "
        "scan.md and scan.png. Without MODEL, the embedded demo model (trained on first use).",
        epilog=EPILOG,
    )
    _add_model_args(p, optional=True)
    p.add_argument("--layers", default="all", help="'all', '12', '1-24' or '1,4,8-16' (default: all)")
    p.add_argument("--suite", default="builtin", help="'builtin' (eval split) or a suite file: JSONL {prompt, label, "
                   "image?}, AdvBench / JailbreakV-28K / XSTest CSV, MM-SafetyBench JSON")  # fmt: skip
    p.add_argument("--images", help="folder of your own benign images for text-only suites")
    p.add_argument("--judge", default="refusal", help=JUDGE_HELP)
    p.add_argument("--limit-per-kind", type=int, help="at most this many items of each kind")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("-o", "--output", default="scan", metavar="DIR", help="output folder (default: ./scan)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser(
        "judge",
        help="label prompt/response pairs as refusal or compliance",
        description="Read a JSONL or CSV with columns prompt and response (or completion); print one JSON line per "
        'row, in order: {"label": "refusal" | "compliance", "score": float} (score: how likely a refusal).',
    )
    p.add_argument("file", help="JSONL or CSV of prompt/response pairs")
    p.add_argument("--judge", default="refusal", help=JUDGE_HELP)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser(
        "align",
        help="re-align the model's safety at an exit layer (L-PPO, or the layer-wise SFT baseline)",
        description="Train LoRA adapters on the language model (vision tower and projector frozen) with PPO whose "
        "rollouts and updates read the image features of exit layer K (or of a layer drawn per batch from A-B), on "
        "the built-in suite's train split. Writes adapter/, merged/ (a plain Hugging Face checkpoint), "
        "value_head.pt, train_log.jsonl, train_curves.png and align.json; checkpoints let a killed run --resume. "
        "Without MODEL, the embedded demo model (trained on first use).",
        epilog=f"{EPILOG} Many GPUs: accelerate launch --config_file configs/accelerate/ddp.yaml (whole model per GPU) "
        "or fsdp.yaml (language model sharded, FSDP2) -m edgekit.cli align MODEL --exit-layer K --device cuda -o OUT; "
        "--batch and --minibatch are totals over the processes.",
    )
    _add_model_args(p, optional=True)
    p.set_defaults(dtype="float32")  # LoRA training in full precision
    p.add_argument("--exit-layer", type=_exit_layer, required=True, metavar="K", help="the exit layer to align")
    p.add_argument("--exit-layers", type=_exit_range, metavar="A-B", help="draw each batch's exit layer from A..B "
                   "(one adapter for a range of exits; must contain K)")  # fmt: skip
    p.add_argument("--reward", default="judge", help="judge (offline refusal judge, default), or a reward model "
                   "folder or hub id (sequence classification, one scalar output)")  # fmt: skip
    p.add_argument("--harm-penalty", type=float, metavar="P", help="judge reward: what answering a harmful request "
                   "costs, against +1 for refusing it and +-1 for helping or not on benign ones (default 3)")
    p.add_argument("--method", default="lppo", choices=("lppo", "sft"), help="lppo (default) or sft (baseline)")
    p.add_argument("--steps", type=int, help="training steps (default 100)")
    p.add_argument("--batch", type=int, help="rollouts per step (default 16)")
    p.add_argument("--minibatch", type=int, help="PPO minibatch (default 4)")
    p.add_argument("--ppo-epochs", type=int, help="PPO epochs per step (default 2)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--max-new-tokens", type=int, help="response length limit (default 48)")
    p.add_argument("--temperature", type=float, help="rollout sampling temperature, 0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, help="rollout top-k, 0 = off (default 0)")
    p.add_argument("--kl-init", type=float, help="initial KL coefficient (default 0.2)")
    p.add_argument("--kl-target", type=float, help="KL target of the adaptive controller (default 3)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints, 0 = none (default 25)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--recompute-activations", action=argparse.BooleanOptionalAction,
                   help="recompute each language-model layer's activations in the backward instead of keeping them: "
                   "memory near inference's, for a second forward through each layer (default on)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder or a stale checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser(
        "build",
        help="scan, align at K, truncate, export for a target, gate every artifact, report (the whole job)",
        description="One command from a base model to verified edge artifacts: scan the original model (default "
        "layer, K and a few more), align it with L-PPO at exit layer K, cut the vision tower at K, export the "
        "target's ONNX and GGUF artifacts, run the safety suite on every artifact in its own runtime (the gate), "
        "benchmark each runtime, and write report.md/.html, a model card (README.md) and manifest.json. Each stage "
        "writes DIR/NN_stage/ with the hashes of its inputs: a rerun skips finished stages and a killed build "
        "resumes. A failed gate exits with code 3 naming metric, value and limit. Without --model, the embedded "
        "demo model (trained on first use). Settings: defaults < target profile < --config build.toml < flags.",
        epilog=EPILOG,
    )
    p.add_argument("--model", help="hub id or local model folder (default: the demo model)")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--exit-layer", type=_exit_layer, metavar="K", help="the exit layer the device will run")
    p.add_argument("--target", help="profile name, jetson, phone, or a profile .toml (default jetson)")
    p.add_argument("-o", "--output", metavar="DIR", help="build folder (default ./build); rerun to resume")
    p.add_argument("--config", metavar="TOML", help="build.toml with any of these settings, [align] and [gates]")
    p.add_argument("--formats", metavar="LIST", help="comma-separated: onnx,gguf (default: the target's)")
    p.add_argument("--scan-layers", help="layers to scan before and after alignment (default auto: every 4th, "
                   "the default layer and K)")  # fmt: skip
    p.add_argument("--limit-per-kind", type=int, help="eval items per suite kind for each measurement (default 100)")
    p.add_argument("--method", choices=("lppo", "sft"), help="alignment method (default lppo)")
    p.add_argument("--reward", help="judge (default) or a reward model folder / hub id")
    p.add_argument("--steps", type=int, help="alignment steps")
    p.add_argument("--batch", type=int, help="alignment rollouts per step")
    p.add_argument("--lr", type=float, help="alignment learning rate")
    p.add_argument("--device", help="torch device for scan and alignment (default cpu)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "verify",
        help="check a build folder against its manifest and re-run the safety gate on its artifacts",
        description="Check the sha256 and size of every file against DIR/manifest.json (a changed, missing or extra "
        "file fails), then answer the eval split again with every artifact in its runtime and apply the build's "
        "gate. Exit code 3 on any failure.",
    )
    p.add_argument("folder", metavar="DIR")
    p.set_defaults(func=cmd_verify)
    return parser


def _quiet_libraries() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        args.func(args)
    except (UserError, GateFailure) as err:
        print(f"edgekit: {'error' if isinstance(err, UserError) else 'failed'}: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
