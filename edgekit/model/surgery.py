"""Exit-layer surgery: make a model's vision tower exit at block k, in memory or for good.

`set_exit_layer` swaps the tower's block list for a shorter list of the SAME modules (no weight is copied) and edits
the config the way a k-block checkpoint would say it; the uncut blocks are remembered, so the exit can move again.
`truncate` does the same and forgets the dropped blocks, so `save_pretrained` writes a plain k-block checkpoint that
transformers loads with no edgekit import.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils.output_capturing import maybe_install_capturing_hooks

from edgekit.errors import UserError
from edgekit.model.families import Family, attr_path, family_for

_UNCUT = "_edgekit_uncut"  # plain attribute (not a registered submodule): state_dict never sees it


@dataclass(frozen=True)
class _Uncut:
    blocks: tuple[nn.Module, ...]
    config: Any  # a copy of the config before any cut


def check_exit_layer(k: Any, num_layers: int) -> int:
    """k as an int in 1..L, or a UserError that says which values are valid."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise UserError(f"exit layer must be an integer in 1..{num_layers}, got {k!r}")
    if not 1 <= k <= num_layers:
        raise UserError(f"exit layer {k} is outside 1..{num_layers} (the vision tower has {num_layers} layers)")
    return k


def _uncut(model, family: Family) -> _Uncut:
    if not hasattr(model, _UNCUT):
        # transformers captures hidden states through hooks it installs lazily, on the tower's first forward, on
        # the blocks present then; install them now, while every block is in the tower, so a later, longer exit
        # still reports them. On the tower itself: hooks installed from the parent model would capture twice.
        maybe_install_capturing_hooks(attr_path(model, family.tower))
        state = _Uncut(tuple(family.stack(model).layers), copy.deepcopy(model.config))
        object.__setattr__(model, _UNCUT, state)
    return getattr(model, _UNCUT)


def num_exit_layers(model) -> int:
    """L of the model as loaded (before any in-memory exit)."""
    family = family_for(model.config)
    return family.num_layers(_uncut(model, family).config)


def set_exit_layer(model, k: int) -> None:
    """Make the vision tower exit at block k (1..L of the uncut model), sharing weights with the uncut model."""
    family = family_for(model.config)
    uncut = _uncut(model, family)
    check_exit_layer(k, family.num_layers(uncut.config))
    values = family.exit_config(uncut.config, k)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        setattr(attr_path(model.config, ".".join(parents)) if parents else model.config, leaf, value)
    family.apply_exit_to_modules(model, values)
    family.stack(model).layers = nn.ModuleList(uncut.blocks[:k])


def truncate(model, k: int) -> None:
    """Cut the vision tower to k blocks for good: the dropped blocks' parameters leave the model."""
    set_exit_layer(model, k)
    object.__delattr__(model, _UNCUT)


def truncate_checkpoint(loaded, k: int, out, *, overwrite: bool = False):
    """Save `loaded` (a LoadedModel) cut to k vision blocks as a plain HF checkpoint in `out`, atomically."""
    from edgekit.outputs import atomic_dir, save_processor

    check_exit_layer(k, num_exit_layers(loaded.model))
    with atomic_dir(out, overwrite) as tmp:
        truncate(loaded.model, k)
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        save_processor(loaded.processor, loaded.source, tmp)
    return Path(out)
