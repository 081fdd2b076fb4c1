"""The `edgekit` command: thin commands over the stage functions. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from edgekit.errors import GateFailure, UserError
from edgekit.tiny import TINY_FAMILIES

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
    from edgekit.loading import load

    return load(
        args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    )  # fmt: skip


def cmd_inspect(args) -> None:
    from edgekit.loading import load_config
    from edgekit.sizes import format_sizes, model_sizes

    config = load_config(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    sizes = model_sizes(config, args.exit_layer)
    print(json.dumps(asdict(sizes), indent=2) if args.json else format_sizes(sizes))


def cmd_truncate(args) -> None:
    from edgekit.loading import load_config
    from edgekit.outputs import check_output_dir
    from edgekit.sizes import human_bytes, model_sizes
    from edgekit.surgery import truncate_checkpoint

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
    from edgekit.tiny import build_tiny, save_tiny

    with atomic_dir(args.output, args.overwrite) as tmp:
        save_tiny(*build_tiny(args.family, seed=args.seed), tmp)
    print(f"wrote a tiny random {args.family} checkpoint to {args.output}")


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
        print(f"edgekit: error: {err}" if isinstance(err, UserError) else f"edgekit: gate failed: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
