"""Parameters and bytes per part of a VLM, from its config alone (the model is built on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgekit.model.families import Family, attr_path, family_for
from edgekit.model.surgery import check_exit_layer
from edgekit.units import human_bytes


@dataclass(frozen=True)
class Part:
    name: str
    params: int
    bytes: int


@dataclass(frozen=True)
class Sizes:
    family: str
    num_layers: int
    default_exit: int
    parts: tuple[Part, ...]  # vision tower, projector, language model, total
    block_params: int  # one vision block
    block_bytes: int
    exit_layer: int | None  # when given: what truncation at it removes
    saved_params: int
    saved_bytes: int


def _count(module: torch.nn.Module, dtype_bytes: int) -> tuple[int, int]:
    n = sum(p.numel() for p in module.parameters())
    return n, n * dtype_bytes


def config_dtype(config) -> torch.dtype:
    """The precision a config says its weights were saved in (float32 when it does not say)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def model_sizes(config, exit_layer: int | None = None, dtype: torch.dtype | None = None) -> Sizes:
    """Sizes of the model `config` describes; with `exit_layer`, also what truncating there saves."""
    from transformers import AutoModelForImageTextToText

    family: Family = family_for(config)
    dtype = dtype or config_dtype(config)
    width = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    tower, projector = attr_path(model, family.tower), attr_path(model, family.projector)
    total = _count(model, width)
    vision, proj = _count(tower, width), _count(projector, width)
    language = (total[0] - vision[0] - proj[0], total[1] - vision[1] - proj[1])
    blocks = family.stack(model).layers
    block = _count(blocks[0], width)
    num_layers = family.num_layers(config)
    dropped = 0 if exit_layer is None else num_layers - check_exit_layer(exit_layer, num_layers)
    return Sizes(
        family=family.name,
        num_layers=num_layers,
        default_exit=family.default_exit(config),
        parts=(
            Part("vision tower", *vision),
            Part("projector", *proj),
            Part("language model", *language),
            Part("total", *total),
        ),
        block_params=block[0],
        block_bytes=block[1],
        exit_layer=exit_layer,
        saved_params=dropped * block[0],
        saved_bytes=dropped * block[1],
    )


def format_sizes(s: Sizes) -> str:
    """A plain-text table for the terminal."""
    lines = [
        f"family           {s.family}",
        f"exitable layers  1..{s.num_layers} (default exit {s.default_exit})",
        f"one vision block {s.block_params:,} params, {human_bytes(s.block_bytes)}",
        "",
        f"{'part':<16}{'params':>16}{'bytes':>14}",
    ]
    lines += [f"{p.name:<16}{p.params:>16,}{human_bytes(p.bytes):>14}" for p in s.parts]
    if s.exit_layer is not None:
        total = s.parts[-1]
        lines += [
            "",
            f"exit at {s.exit_layer}: drops {s.num_layers - s.exit_layer} vision blocks = {s.saved_params:,} params, "
            f"{human_bytes(s.saved_bytes)} ({100 * s.saved_params / total.params:.1f}% of the model)",
        ]
    return "\n".join(lines)
