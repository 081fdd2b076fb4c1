"""Checkpoints of an alignment run, so a killed run resumes to exactly the result of an uninterrupted one.

An unfinished run keeps one checkpoint in a hidden work folder beside its output, written whole (temporary file, then
rename). It holds the run's identity (model, method, reward, process count, settings: a resume must match them), the
loop's state (step, KL controller, the stream that draws items and exit layers, the log), every process's random
state, and the adapter, value-head and optimizer state as whole tensors, so sharded and unsharded runs load them alike.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgekit.align.config import LPPOConfig
from edgekit.align.policy import Learner, unwrapped_optimizer
from edgekit.align.ppo_math import KLControllerState
from edgekit.align.sharding import copy_into_shard, gather_to_cpu
from edgekit.errors import UserError
from edgekit.outputs import check_output_dir

CHECKPOINT = "checkpoint.pt"


def work_dir(output: str | Path) -> Path:
    """Where an unfinished run keeps its checkpoint: a hidden folder beside the output."""
    output = Path(output)
    return output.parent / f".{output.name}.work"


def read_checkpoint(work: Path) -> dict | None:
    path = work / CHECKPOINT
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def write_checkpoint(work: Path, state: dict) -> None:
    """Whole or not at all: a temporary file, flushed to disk, then renamed over the previous checkpoint."""
    tmp = work / f"{CHECKPOINT}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, work / CHECKPOINT)


def check_output_and_checkpoint(output: str | Path, *, resume: bool, overwrite: bool) -> dict | None:
    """Refuse an output in use (a non-empty folder, or an unfinished run's checkpoint) unless told; returns the
    checkpoint to resume from, if any. Reads only: nothing is written before every check has passed."""
    output = Path(output)
    if resume and not overwrite and output.exists() and any(output.iterdir()):
        raise UserError(f"{output}: already holds a finished result; nothing to resume (pass --overwrite to redo it)")
    check_output_dir(output, overwrite)
    work = work_dir(output)
    checkpoint = read_checkpoint(work) if (work / CHECKPOINT).is_file() else None
    if checkpoint is not None and not resume and not overwrite:
        raise UserError(
            f"{output}: an unfinished run left a checkpoint at step {checkpoint['step']} in {work}; "
            "pass --resume to continue it or --overwrite to start over"
        )
    return checkpoint if resume else None


def run_identity(loaded, config: LPPOConfig, method: str, reward_name: str, processes: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint (also the head of align.json)."""
    return {
        "model": str(loaded.source),
        "method": method,
        "reward": reward_name,
        "processes": processes,
        "config": asdict(config),
    }


def check_resumable(checkpoint: dict, identity: dict, work: Path) -> None:
    theirs, ours = checkpoint["identity"], identity
    diffs = [
        f"{k}={theirs.get(k)!r} there, {ours[k]!r} here"
        for k in ("model", "method", "reward", "processes")
        if theirs.get(k) != ours[k]
    ]
    diffs += [
        f"{k}={theirs['config'].get(k)!r} there, {v!r} here"
        for k, v in ours["config"].items()
        if _tuple_as_list(theirs["config"].get(k)) != _tuple_as_list(v)
    ]
    if diffs:
        raise UserError(f"cannot resume the checkpoint in {work}: {'; '.join(diffs)} (pass --overwrite to start over)")


def _tuple_as_list(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass
class TrainingState:
    """What a checkpoint holds besides the weights and the optimizer (mutable: it is the loop's state)."""

    step: int
    kl: KLControllerState
    rng: random.Random
    log: list[dict]


def trained_weights(policy, value_head) -> dict[str, dict[str, torch.Tensor] | None]:
    """The adapter and value-head weights, whole (gathered from every process when sharded: all must call this)."""
    adapter = {n: gather_to_cpu(p) for n, p in policy.named_parameters() if p.requires_grad}
    head = {n: gather_to_cpu(p) for n, p in value_head.state_dict().items()} if value_head is not None else None
    return {"adapter": adapter, "value_head": head}


def load_trained_weights(weights: dict, policy, value_head) -> None:
    """The inverse of `trained_weights`: whole tensors into this process's (possibly sharded) parameters."""
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    if set(params) != set(weights["adapter"]):
        raise UserError("the checkpoint's adapter does not match this model's (pass --overwrite to start over)")
    for name, p in params.items():
        copy_into_shard(p, weights["adapter"][name])
    if value_head is not None:
        for name, p in value_head.named_parameters():
            copy_into_shard(p, weights["value_head"][name])


def checkpoint_state(run: TrainingState, learner: Learner, policy, value_head, identity: dict) -> dict:
    """Every process must call this: it gathers each one's random state, and sharded weights and optimizer state."""
    from accelerate.utils import gather_object
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    device = next(policy.parameters()).device
    options = _whole_state_dict_options()
    optimizer = get_optimizer_state_dict(learner.module, unwrapped_optimizer(learner), options=options)
    return {
        "identity": identity,
        "step": run.step,
        "log": run.log,
        "kl": run.kl._asdict(),
        "rng": run.rng.getstate(),
        "process_rng": gather_object([_process_rng(device)]),
        **trained_weights(policy, value_head),
        "optimizer": _on_cpu(optimizer),
    }


def restore(state: dict, learner: Learner, policy, value_head, process: int) -> TrainingState:
    """Load a checkpoint into this process's weights, optimizer and random state; returns the loop's state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    load_trained_weights(state, policy, value_head)
    set_optimizer_state_dict(
        learner.module, unwrapped_optimizer(learner), state["optimizer"], options=_whole_state_dict_options()
    )
    rng = random.Random()
    rng.setstate(_lists_as_tuples(state["rng"]))
    _set_process_rng(state["process_rng"][process], next(policy.parameters()).device)
    return TrainingState(state["step"], KLControllerState(**state["kl"]), rng, list(state["log"]))


def _whole_state_dict_options():
    """Optimizer state keyed by parameter name, each tensor whole: it loads into sharded and unsharded runs alike."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def _process_rng(device: torch.device) -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_process_rng(state: dict, device: torch.device) -> None:
    random.setstate(_lists_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _on_cpu(tree):
    if torch.is_tensor(tree):
        return gather_to_cpu(tree)
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    return [_on_cpu(v) for v in tree] if isinstance(tree, list) else tree


def _lists_as_tuples(value):
    return tuple(_lists_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
