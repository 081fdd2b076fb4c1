"""The `edgekit` command line: its arguments and help (`edgekit.commands` does the work). User mistakes exit 2 with one
line on stderr, a failed safety gate exits 3."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from edgekit import commands
from edgekit.align.config import LPPOConfig
from edgekit.build.config import BUILD_DTYPES, METHODS
from edgekit.errors import GateFailure, UserError
from edgekit.model.tiny import TINY_FAMILIES
from edgekit.outputs import stop_if_terminated, terminate

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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="hub id (owner/name) or local model folder (default: the demo model)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16 or bfloat16")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--trust-remote-code", action="store_true", help="run the repo's own Python code (off by default)")


def _exit_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range A-B of exit layers, e.g. 3-5, got {text!r}") from None


JUDGE_HELP = (
    "refusal (offline, default), keyword (baseline) or llama-guard[:MODEL] (Llama Guard 3 decides attack "
    "success; a folder or hub id, default meta-llama/Llama-Guard-3-8B)"
)


def _add_align_flags(p: argparse.ArgumentParser) -> None:
    """One flag per LPPOConfig field the command line sets, its help and default taken from the dataclass."""
    for f in LPPOConfig.flags():
        flag, text = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(flag, type=type(f.default), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgekit",
        description="Ship vision-language models with an early-exited image encoder to phones and Jetson boards, "
        "with their safety re-aligned at the exit layer and checked on every artifact.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "inspect",
        help="family, exitable layers, parameters and bytes per part",
        description="Read MODEL's config (no weights) and show its family, its exitable vision layers and the "
        "parameters and bytes of each part. Without MODEL, the embedded demo model (trained on first use).",
        epilog=EPILOG,
    )
    _add_model_args(p)
    p.add_argument("--exit-layer", type=_exit_layer, help="also show what truncating at this layer saves")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=commands.cmd_inspect)

    p = sub.add_parser(
        "truncate",
        help="cut the vision tower after block K and save a plain Hugging Face checkpoint",
        description="Physically remove vision blocks K+1..L and rewrite the config, so the saved checkpoint loads "
        "with plain transformers (no edgekit import) and computes what the original computes when exiting at K. "
        "Without MODEL, the embedded demo model (trained on first use).",
        epilog=EPILOG,
    )
    _add_model_args(p)
    p.add_argument("--exit-layer", type=_exit_layer, required=True, metavar="K", help="keep vision blocks 1..K")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=commands.cmd_truncate)

    p = sub.add_parser(
        "tiny",
        help="write a tiny random checkpoint of a family, in the real hub layout (for tests and CI)",
        description="Build a tiny random model (full vision depth, tiny width) with a locally trained tokenizer, "
        "image processor and chat template, saved exactly as the family's hub repos are laid out.",
    )
    p.add_argument("family", choices=TINY_FAMILIES, help="the family, named as its configs name it")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=commands.cmd_tiny)

    p = sub.add_parser("targets", help="list the target device profiles")
    p.set_defaults(func=commands.cmd_targets)

    p = sub.add_parser(
        "export",
        help="cut the vision tower at K and write a target's ONNX / GGUF artifacts with a manifest",
        description="Cut the vision tower after block K, export ONNX graphs (quantized for the target) and GGUF files "
        "(language model + mmproj for llama.cpp), write manifest.json with sha256 of every file, and check the "
        "artifacts fit the target's memory budget. The output folder appears whole or not at all. Without MODEL, the "
        "embedded demo model (trained on first use).",
        epilog=EPILOG,
    )
    _add_model_args(p)  # --dtype auto: a half-precision model exports fp16 graphs as it is, others via float32
    p.add_argument("--exit-layer", type=_exit_layer, required=True, metavar="K", help="keep vision blocks 1..K")
    p.add_argument("--target", required=True, metavar="T", help="profile name, jetson, phone, or a profile .toml")
    p.add_argument(
        "--formats",
        metavar="LIST",
        help="comma-separated: onnx, gguf (the language model), mmproj (llama.cpp's own vision pipeline, opt-in: "
        "broken upstream for LLaVA; see README) (default: the target's formats)",
    )
    p.add_argument(
        "--onnx-quantization",
        metavar="SCHEME",
        help="one of the target's ONNX options (edgekit targets); default: the target's, or where its artifacts "
        "would be over the budget, the next option that fits",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser(
        "scan",
        help="measure ASR, over-refusal and utility at every exit layer (the ICET scan)",
        description="Answer the safety suite at each exit layer and judge the answers. One vision-tower forward per "
        "batch of images gives every layer's features; answers are batched greedy generations. Writes scan.json, "
        "scan.md and scan.png. Without MODEL, the embedded demo model (trained on first use).",
        epilog=EPILOG,
    )
    _add_model_args(p)
    p.add_argument("--layers", default="all", help="'all', '12', '1-24' or '1,4,8-16' (default: all)")
    p.add_argument(
        "--suite",
        default="builtin",
        help="'builtin' (eval split) or a suite file: JSONL {prompt, label, "
        "image?}, AdvBench / JailbreakV-28K / XSTest CSV, MM-SafetyBench JSON",
    )
    p.add_argument("--images", help="folder of your own benign images for text-only suites")
    p.add_argument("--judge", default="refusal", help=JUDGE_HELP)
    p.add_argument("--limit-per-kind", type=int, help="at most this many items of each kind")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="items per batch at most (default 32); fewer where a batch's activations and KV cache would pass a "
        "fifth of the weights' bytes (256 MiB for small models)",
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("-o", "--output", default="scan", metavar="DIR", help="output folder (default: ./scan)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=commands.cmd_scan)

    p = sub.add_parser(
        "judge",
        help="label prompt/response pairs as refusal or compliance",
        description="Read a JSONL or CSV with columns prompt and response (or completion); print one JSON line per "
        'row, in order: {"label": "refusal" | "compliance", "score": float} (score: how likely a refusal).',
    )
    p.add_argument("file", help="JSONL or CSV of prompt/response pairs")
    p.add_argument("--judge", default="refusal", help=JUDGE_HELP)
    p.set_defaults(func=commands.cmd_judge)

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
    _add_model_args(p)
    p.set_defaults(dtype="float32")  # LoRA training in full precision
    p.add_argument("--exit-layer", type=_exit_layer, required=True, metavar="K", help="the exit layer to align")
    p.add_argument(
        "--exit-layers",
        type=_exit_range,
        metavar="A-B",
        help="draw each batch's exit layer from A..B (one adapter for a range of exits; must contain K)",
    )
    p.add_argument(
        "--reward",
        default="judge",
        help="judge (offline refusal judge, default), or a reward model "
        "folder or hub id (sequence classification, one scalar output)",
    )
    p.add_argument(
        "--harm-penalty",
        type=float,
        metavar="P",
        help="judge reward: what answering a harmful request "
        "costs, against +1 for refusing it and +-1 for helping or not on benign ones (default 3)",
    )
    p.add_argument("--method", default="lppo", choices=("lppo", "sft"), help="lppo (default) or sft (baseline)")
    _add_align_flags(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder or a stale checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=commands.cmd_align)

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
    p.add_argument("--formats", metavar="LIST", help="comma-separated: onnx,gguf[,mmproj] (default: the target's)")
    p.add_argument(
        "--scan-layers",
        help="layers to scan before and after alignment (default auto: every 4th, the default layer and K)",
    )
    p.add_argument("--limit-per-kind", type=int, help="eval items per suite kind for each measurement (default 100)")
    p.add_argument(
        "--method",
        choices=METHODS,
        help="alignment method: lppo (default), sft (the layer-wise SFT baseline) or none (no alignment: the early "
        "exit as it comes, to see what the gate catches)",
    )
    p.add_argument("--reward", help="judge (default) or a reward model folder / hub id")
    p.add_argument("--steps", type=int, help="alignment steps")
    p.add_argument("--batch", type=int, help="alignment rollouts per step")
    p.add_argument("--lr", type=float, help="alignment learning rate")
    p.add_argument("--device", help="torch device for scan and alignment (default cpu)")
    p.add_argument(
        "--dtype",
        choices=BUILD_DTYPES,
        help="precision of scans and alignment (default float32; bfloat16 or float16 on a GPU; auto: the "
        "checkpoint's own, so a half-precision model is not held in a second, converted copy); truncation and "
        "export keep the checkpoint's",
    )
    p.set_defaults(func=commands.cmd_build)

    p = sub.add_parser(
        "verify",
        help="check a build folder against its manifest and re-run the safety gate on its artifacts",
        description="Check the sha256 and size of every file against DIR/manifest.json (a changed, missing or extra "
        "file fails), then answer the eval split again with every artifact in its runtime and apply the build's "
        "gate. With --device, the device answers with the runtimes the build ships (a bundle is copied there) and "
        "this machine judges; the verdicts land in DIR/devices/<device>/ and in the report. Exit code 3 on any "
        "failure.",
        epilog=DEVICE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="DIR")
    _add_device_args(p, default=None)
    p.set_defaults(func=commands.cmd_verify)

    p = sub.add_parser(
        "bundle",
        help="pack a build's artifacts with a torch-free runner, for a device",
        description="Write OUT: the artifacts of the chosen runtimes (hard links where possible), the part of "
        "edgekit a device runs (numpy, onnxruntime, llama-cpp-python, tokenizers, jinja2, Pillow; no torch, no "
        "transformers) and requirements.txt. Copy it to a board, pip install -r requirements.txt, and `edgekit bench` "
        "or `edgekit verify` drive it there; `edgekit bench/verify --device` make and copy one themselves.",
    )
    p.add_argument("folder", metavar="DIR", help="a build folder (edgekit build -o) or an export folder")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument(
        "--runtimes", type=_runtimes, help="comma-separated, e.g. onnx,hybrid (default: all the build ships)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=commands.cmd_bundle)

    p = sub.add_parser(
        "bench",
        help="time and measure each runtime of a build on this machine or a device",
        description="Each runtime in its own fresh process on the device: load seconds, vision encode and prefill "
        "ms, time to first token, decode tokens/s (medians over the prompts), and the process's peak RSS (VmHWM). "
        "DIR is a build folder (the results also land in DIR/devices/<device>/ and in its report), an export "
        "folder or a bundle.",
        epilog=DEVICE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="DIR")
    _add_device_args(p, default="local")
    p.add_argument("--runtimes", type=_runtimes, help="comma-separated, e.g. onnx,hybrid (default: all it ships)")
    p.add_argument("--prompts", type=int, default=5, help="utility prompts, one timed run each (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per timed run, eos ignored (default 24)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON instead of a table")
    p.set_defaults(func=commands.cmd_bench)
    return parser


DEVICE_EPILOG = """devices:
  local                    this machine
  ssh://user@host[:port]   a Jetson or Linux board: keys from ~/.ssh/config (never a password prompt), more
                           options in EDGEKIT_SSH_OPTIONS, e.g. "-i ~/.ssh/jetson -o UserKnownHostsFile=FILE"
  adb  or  adb:SERIAL      an Android phone with USB debugging and a Python (Termux), files in /data/local/tmp
The device needs Python 3.10+ with the bundle's requirements.txt installed (or, with --llama-bin, only llama.cpp's
llama-bench and llama-mtmd-cli built for it); the bundle is copied once per version into --remote-dir and reused."""


def _runtimes(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _add_device_args(p: argparse.ArgumentParser, default: str | None) -> None:
    where = "default: this machine" if default else "default: the gate runs here, every artifact included"
    p.add_argument("--device", default=default, help=f"local, ssh://user@host[:port], adb or adb:SERIAL ({where})")
    p.add_argument("--python", help="the device's Python (default python3; local: this one)")
    p.add_argument(
        "--remote-dir",
        help="where bundles and jobs go on the device (default: ~/.cache/edgekit/device, or /data/local/tmp/edgekit)",
    )
    p.add_argument(
        "--llama-bin",
        metavar="DIR",
        help="run the gguf artifacts with llama.cpp's llama-bench and llama-mtmd-cli built for the device (from "
        "DIR; no Python needed there, e.g. an Android build)",
    )


def _quiet_libraries() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _exit_on_sigterm(signum, frame):
    terminate(signum)  # unwinds like Ctrl-C: temporary folders go, nothing half-written stays


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        args.func(args)
        stop_if_terminated()  # a swallowed SIGTERM still ends the run with its exit code
    except Exception as err:
        stop_if_terminated()  # a library the SIGTERM's SystemExit passed through may have re-raised it as another error
        if not isinstance(err, (UserError, GateFailure)):
            raise
        print(f"edgekit: {'error' if isinstance(err, UserError) else 'failed'}: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
