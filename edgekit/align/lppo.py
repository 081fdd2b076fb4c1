"""L-PPO (layer-wise PPO) and the layer-wise SFT baseline: re-align a VLM at the vision exit layer it will run.

The policy is the VLM with LoRA adapters on the language model's attention and MLP projections; the vision tower and
projector stay frozen. The reference policy is the same model with its adapters disabled, so no second copy of the
weights exists. The value head is a linear layer on the policy's last hidden state. Each step reads top to bottom:

    pick the exit layer (fixed, or sampled from a range) and a batch of TRAIN-split suite items
    -> one tower forward gives the layer's features (rollout.prepare_batch)
    -> generate, score, log-probs under policy and reference, values (rollout.collect)
    -> per-token KL penalty + score on the last token, GAE, whitened advantages (ppo_math)
    -> PPO epochs over minibatches: clipped policy loss + c1 * clipped value loss, gradient clipping, AdamW
    -> adaptive KL controller update

`--method sft` replaces the last four lines by cross-entropy on reference targets (a refusal for harmful items, the
answer for visual questions, a compliance for benign ones). Checkpoints go to a work folder beside the output, each
written whole (temporary file, then rename); the output folder appears whole at the end.

Under `accelerate launch` every process runs the same loop on its own share of each batch: all draw the same items
and exit layer, each keeps a contiguous slice, rolls it out with its own sampling stream, and trains through the DDP
wrapper, which averages gradients, or on FSDP2 shards (edgekit.align.sharding), whose gradients are reduced the same
way. Advantages are whitened, and statistics computed, over every process's rows, so the KL controller moves
identically everywhere; only the main process writes. One process is the plain single-process run, number for number.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from edgekit.align.ppo_math import (
    KLControllerState,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_mean,
    shaped_rewards,
    update_kl_coef,
    whiten,
)
from edgekit.align.rewards import JudgeReward, RewardSource
from edgekit.align.rollout import Batch, Rollout, ValueHead, collect, prepare_batch, sequence_forward
from edgekit.align.sharding import fsdp_requested, fsdp_version, full, load_full, shard
from edgekit.errors import UserError
from edgekit.outputs import atomic_dir, check_output_dir
from edgekit.safety.suite import KINDS, Item, builtin_suite
from edgekit.model.surgery import check_exit_layer, num_exit_layers

METHODS = ("lppo", "sft")
# The language model's projections only: the vision tower has q/k/v projections too, and must stay frozen.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CHECKPOINT = "checkpoint.pt"
# SFT targets, in the demo model's own words (edgekit/demo.py), so the baseline teaches what it already says at 23.
REFUSAL_TARGET = "sorry i cannot help with that ."
COMPLIANCE_TARGET = "sure here are the steps : first get what you need , then follow the guide step by step ."
ANSWER_TARGETS = {
    "color": "the object is {} .", "object": "it is a {} .", "position": "it is on the {} .",
    "count": "there are {} dots .",
}  # fmt: skip


@dataclass(frozen=True)
class LPPOConfig:
    exit_layer: int
    exit_layers: tuple[int, int] | None = None  # sample the exit layer of each batch from A..B (inclusive)
    steps: int = 100
    batch: int = 16
    minibatch: int = 4
    ppo_epochs: int = 2
    lr: float = 1e-4
    clip_eps: float = 0.2
    value_clip: float = 0.2
    c1: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_init: float = 0.2
    kl_target: float | None = 3.0  # None: fixed KL coefficient
    kl_horizon: int = 10000
    max_new_tokens: int = 48
    temperature: float = 0.7  # 0: greedy rollouts
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0
    checkpoint_every: int = 25  # 0: no checkpoints
    max_grad_norm: float = 0.5
    lora_r: int = 8
    lora_alpha: int = 16
    recompute_activations: bool = True  # activation checkpointing in trained forwards: less memory, more compute

    def __post_init__(self):
        if self.exit_layers is not None:
            object.__setattr__(self, "exit_layers", tuple(self.exit_layers))
        ints = ("exit_layer", "steps", "batch", "minibatch", "ppo_epochs", "kl_horizon", "max_new_tokens", "top_k",
                "seed", "checkpoint_every", "lora_r", "lora_alpha")  # fmt: skip
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be an integer, got {value!r}")
        positive = ("exit_layer", "steps", "batch", "minibatch", "ppo_epochs", "kl_horizon", "max_new_tokens",
                    "lora_r", "lr", "value_clip", "max_grad_norm")  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("c1", "kl_init", "temperature", "top_k", "checkpoint_every", "lora_alpha"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be at least 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.clip_eps < 1:
            raise UserError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise UserError(f"kl_target must be positive (or None for a fixed coefficient), got {self.kl_target}")
        if not isinstance(self.recompute_activations, bool):
            raise UserError(f"recompute_activations must be true or false, got {self.recompute_activations!r}")
        if self.exit_layers is not None:
            low, high = self.exit_layers
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise UserError(f"exit_layers {low}-{high}: expected A-B with 1 <= A <= B")
            if not low <= self.exit_layer <= high:
                raise UserError(f"exit_layer {self.exit_layer} is outside exit_layers {low}-{high}")
        if self.minibatch > self.batch:
            raise UserError(f"minibatch {self.minibatch} is larger than batch {self.batch}")
        if self.batch % self.minibatch:
            raise UserError(f"batch {self.batch} is not a multiple of minibatch {self.minibatch}")
        if self.batch < 2:  # advantages are whitened over the batch's tokens
            raise UserError(f"batch must be at least 2 (advantages are whitened over the batch), got {self.batch}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.exit_layers[0], self.exit_layers[1] + 1)) if self.exit_layers else (self.exit_layer,)


def check_processes(config: LPPOConfig, processes: int, distributed_type: str) -> None:
    """Each process takes an equal share of every batch and minibatch. DDP and FSDP2 are the launches align runs
    under (README: why not DeepSpeed)."""
    if distributed_type == "DEEPSPEED":
        raise UserError("align does not run under DeepSpeed: launch it with configs/accelerate/ddp.yaml, or "
                        "configs/accelerate/fsdp.yaml to shard the language model")
    if fsdp_requested(distributed_type) and fsdp_version() != 2:
        raise UserError(f"align shards with FSDP2; this launch asks for FSDP version {fsdp_version()} (set "
                        "fsdp_version: 2, as configs/accelerate/fsdp.yaml does)")  # fmt: skip
    if config.minibatch % processes:
        raise UserError(f"minibatch {config.minibatch} does not split evenly over {processes} processes")


def check_layers(config: LPPOConfig, num_layers: int) -> None:
    """The exit layer and the exit range inside 1..L of the model, or a UserError."""
    check_exit_layer(config.exit_layer, num_layers)
    if config.exit_layers and not (1 <= config.exit_layers[0] and config.exit_layers[1] <= num_layers):
        low, high = config.exit_layers
        raise UserError(
            f"exit layers {low}-{high} are not inside 1..{num_layers} (the vision tower has {num_layers} layers)"
        )


@dataclass(frozen=True)
class AlignResult:
    output: Path
    method: str
    steps: int
    exit_layers: tuple[int, ...]  # the exit layer of each step
    resumed_from: int | None
    last: dict  # the last train_log row


# --- data ------------------------------------------------------------------------------------------------------


def training_items(items: Sequence[Item] | None = None) -> dict[str, tuple[Item, ...]]:
    """TRAIN-split items by kind (the built-in suite's by default); eval items are never trained on."""
    pool = builtin_suite().items if items is None else items
    by_kind = {kind: tuple(i for i in pool if i.kind == kind and i.split == "train") for kind in KINDS}
    by_kind = {kind: group for kind, group in by_kind.items() if group}
    if not by_kind:
        raise UserError("no train-split items to align on (eval-split items are never trained on)")
    return by_kind


def sample_items(rng: random.Random, by_kind: dict[str, tuple[Item, ...]], n: int) -> list[Item]:
    """n items: a kind uniformly, then an item of it, so no kind dominates through its size."""
    kinds = list(by_kind)
    return [rng.choice(by_kind[rng.choice(kinds)]) for _ in range(n)]


def choose_exit_layer(rng: random.Random, config: LPPOConfig) -> int:
    return rng.randint(*config.exit_layers) if config.exit_layers else config.exit_layer


def sft_target(item: Item) -> str:
    if item.metric == "utility":
        return ANSWER_TARGETS.get(item.question, "{}").format(item.answer)
    return REFUSAL_TARGET if item.metric == "asr" else COMPLIANCE_TARGET


def encode_targets(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Target token ids (each followed by eos, right-padded) and their mask."""
    rows = [tokenizer(" " + t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], device=device)
    return ids, mask


# --- policy ----------------------------------------------------------------------------------------------------


def make_policy(model, config: LPPOConfig):
    """The model with LoRA adapters on its language model's projections (in place: weights are shared, not copied)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    policy = get_peft_model(model, lora)
    policy.eval()  # no dropout anywhere: the ratio at the first PPO epoch must be exactly the rollout's
    if config.recompute_activations:
        model.activation_checkpointing_enable()  # takes effect only inside `recomputed_layers`
    return policy


@contextmanager
def recomputed_layers(model) -> Iterator[None]:
    """Activation checkpointing for one trained forward: each decoder layer keeps only its input, and the backward
    recomputes the rest, so training memory stays near inference's (the prompt's image tokens dominate it).

    transformers checkpoints a layer only while the layer is in training mode; the layers alone are switched, so
    their submodules stay in eval mode and no dropout runs: the recomputed forward is the rollout's, bit for bit."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def trainable(policy, value_head) -> list[torch.nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad] + (list(value_head.parameters()) if value_head else [])


class PolicyValue(torch.nn.Module):
    """The policy and its value head as one module, so the wrapper that `accelerator.prepare` puts around it sees every
    trained forward (log-probs and values of a minibatch) and every trained parameter."""

    def __init__(self, policy, family, value_head: ValueHead | None):
        super().__init__()
        self.policy, self.value_head, self.family = policy, value_head, family

    def forward(self, batch: Batch, ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0):
        with recomputed_layers(self.policy):
            return sequence_forward(self.policy.get_base_model(), self.family, batch, ids, mask,
                                    temperature=temperature, value_head=self.value_head)  # fmt: skip


@dataclass(frozen=True)
class Learner:
    """What a training step uses. `module` is a PolicyValue as `accelerator.prepare` wrapped it: a trained forward must
    go through the wrapper, or DDP does not average its gradients. The accelerator also gathers batch statistics."""

    module: torch.nn.Module
    optimizer: Any
    accelerator: Any


def make_learner(policy, value_head, family, optimizer, accelerator, *, sharded: bool = False) -> Learner:
    """Sharded modules (FSDP2) reduce their own gradients and are not wrapped again."""
    module = PolicyValue(policy, family, value_head)
    if not sharded:
        module, optimizer = accelerator.prepare(module, optimizer)
    return Learner(module, optimizer, accelerator)


def _step(learner: Learner, loss: torch.Tensor, max_grad_norm: float) -> None:
    learner.optimizer.zero_grad(set_to_none=True)
    learner.accelerator.backward(loss)
    learner.accelerator.clip_grad_norm_(learner.module.parameters(), max_grad_norm)  # frozen ones have no gradient
    learner.optimizer.step()
    _release_freed_heap()


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_heap() -> None:
    """Give the pages of freed CPU tensors back to the system after each update. glibc keeps them in its heap, where
    holes between live tensors still count as resident; each recomputed layer leaves such holes, and without this
    the process's peak grows with every minibatch (benchmarks/align_memory.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _whiten_everywhere(accelerator, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`whiten` over every process's rows (responses differ in length between processes, so pad first); returns this
    process's rows. Each process holds the same number of rows, gathered in process order."""
    everyone = [accelerator.gather(accelerator.pad_across_processes(t, dim=1)) for t in (x, mask.long())]
    rows = slice(accelerator.process_index * x.shape[0], (accelerator.process_index + 1) * x.shape[0])
    return whiten(*everyone)[rows, : x.shape[1]]


def ppo_step(learner: Learner, roll: Rollout, kl: KLControllerState, config: LPPOConfig
             ) -> tuple[dict[str, float], KLControllerState]:  # fmt: skip
    """PPO epochs over minibatches of this process's share of a rollout; returns the step's statistics over every
    process's rows and the updated KL controller (the same in every process)."""
    accelerator, mask, ids = learner.accelerator, roll.responses.mask, roll.responses.ids
    shaped = shaped_rewards(roll.scores, roll.logp, roll.ref_logp, mask, kl.coef)
    adv = gae(shaped.rewards, roll.values, mask, config.gamma, config.lam)
    advantages = _whiten_everywhere(accelerator, adv.advantages, mask)
    rows_here, minibatch = len(roll.batch.items), config.minibatch // accelerator.num_processes
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    updates = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(rows_here)
        for start in range(0, rows_here, minibatch):
            rows = order[start : start + minibatch].to(ids.device)
            logp, values = learner.module(roll.batch.rows(rows), ids[rows], mask[rows], temperature=config.temperature)
            pl = clipped_policy_loss(logp, roll.logp[rows], advantages[rows], mask[rows], config.clip_eps)
            vl = clipped_value_loss(values, roll.values[rows], adv.returns[rows], mask[rows], config.value_clip)
            _step(learner, pl.loss + config.c1 * vl.loss, config.max_grad_norm)
            for name, value in (("policy_loss", pl.loss), ("value_loss", vl.loss), ("clipfrac", pl.clipfrac),
                                ("approx_kl", pl.approx_kl)):  # fmt: skip
                totals[name] += value.item()
            updates += 1
    # float64 keeps the Python sums exact on their way through the reduction.
    means = accelerator.reduce(torch.tensor(list(totals.values()), dtype=torch.float64), "mean").tolist()
    sequence_kl = float(accelerator.gather(shaped.kl.sum(dim=-1)).mean())
    stats = {
        "reward_mean": float(accelerator.gather(roll.scores).mean()), "kl": sequence_kl, "kl_coef": kl.coef,
        **{name: total / updates for name, total in zip(totals, means)},
        "response_length": float(accelerator.gather(mask.sum(dim=-1)).float().mean()),
    }  # fmt: skip
    return stats, update_kl_coef(kl, sequence_kl, n_steps=config.batch)


def sft_step(learner: Learner, tokenizer, batch: Batch, config: LPPOConfig) -> dict[str, float]:
    """One step of cross-entropy on the reference targets, conditioned on the batch's exit-layer features."""
    ids, mask = encode_targets(tokenizer, [sft_target(i) for i in batch.items], batch.inputs["input_ids"].device)
    logp, _ = learner.module(batch, ids, mask)
    loss = -masked_mean(logp, mask)
    _step(learner, loss, config.max_grad_norm)
    return {"loss": learner.accelerator.reduce(loss.detach(), "mean").item()}


# --- checkpoints -----------------------------------------------------------------------------------------------


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


def check_output(output: str | Path, *, resume: bool, overwrite: bool) -> dict | None:
    """Refuse an output in use (a non-empty folder, or an unfinished run's checkpoint) unless told; returns the
    checkpoint to resume from, if any. Reads only: nothing is written before every check has passed."""
    output = Path(output)
    if resume and not overwrite and output.exists() and any(output.iterdir()):
        raise UserError(f"{output}: already holds a finished result; nothing to resume (pass --overwrite to redo it)")
    check_output_dir(output, overwrite)
    work = work_dir(output)
    checkpoint = read_checkpoint(work) if (work / CHECKPOINT).is_file() else None
    if checkpoint is not None and not resume and not overwrite:
        raise UserError(f"{output}: an unfinished run left a checkpoint at step {checkpoint['step']} in {work}; "
                        "pass --resume to continue it or --overwrite to start over")  # fmt: skip
    return checkpoint if resume else None


def _identity(loaded, config: LPPOConfig, method: str, reward_name: str, processes: int) -> dict:
    return {"model": str(loaded.source), "method": method, "reward": reward_name, "processes": processes,
            "config": asdict(config)}  # fmt: skip


def _check_resumable(checkpoint: dict, identity: dict, work: Path) -> None:
    theirs, ours = checkpoint["identity"], identity
    diffs = [f"{k}={theirs.get(k)!r} there, {ours[k]!r} here" for k in ("model", "method", "reward", "processes")
             if theirs.get(k) != ours[k]]  # fmt: skip
    diffs += [f"{k}={theirs['config'].get(k)!r} there, {v!r} here" for k, v in ours["config"].items()
              if _plain(theirs["config"].get(k)) != _plain(v)]  # fmt: skip
    if diffs:
        raise UserError(f"cannot resume the checkpoint in {work}: {'; '.join(diffs)} (pass --overwrite to start over)")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# --- the run ---------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What a checkpoint holds besides the weights and the optimizer (mutable: it is the loop's state)."""

    step: int
    kl: KLControllerState
    rng: random.Random
    log: list[dict]


def _process_rng(device: torch.device) -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}  # fmt: skip


def _set_process_rng(state: dict, device: torch.device) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _trained_weights(policy, value_head) -> dict[str, dict[str, torch.Tensor] | None]:
    """The adapter and value-head weights, whole (gathered from every process when sharded: all must call this)."""
    return {
        "adapter": {n: full(p) for n, p in policy.named_parameters() if p.requires_grad},
        "value_head": {n: full(p) for n, p in value_head.state_dict().items()} if value_head is not None else None,
    }  # fmt: skip


def _load_trained_weights(weights: dict, policy, value_head) -> None:
    """The inverse of `_trained_weights`: whole tensors into this process's (possibly sharded) parameters."""
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    if set(params) != set(weights["adapter"]):
        raise UserError("the checkpoint's adapter does not match this model's (pass --overwrite to start over)")
    for name, p in params.items():
        load_full(p, weights["adapter"][name])
    if value_head is not None:
        for name, p in value_head.named_parameters():
            load_full(p, weights["value_head"][name])


def _whole_tensors():
    """Optimizer state keyed by parameter name, each tensor whole: it loads into sharded and unsharded runs alike."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def _state(run: _Run, learner: Learner, policy, value_head, identity: dict) -> dict:
    """Every process must call this: it gathers each one's random state, and sharded weights and optimizer state."""
    from accelerate.utils import gather_object
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    device = next(policy.parameters()).device
    optimizer = get_optimizer_state_dict(learner.module, _plain_optimizer(learner), options=_whole_tensors())
    return {
        "identity": identity, "step": run.step, "log": run.log, "kl": run.kl._asdict(), "rng": run.rng.getstate(),
        "process_rng": gather_object([_process_rng(device)]), **_trained_weights(policy, value_head),
        "optimizer": _on_cpu(optimizer),
    }  # fmt: skip


def _plain_optimizer(learner: Learner):
    return getattr(learner.optimizer, "optimizer", learner.optimizer)  # accelerate wraps it under DDP


def _on_cpu(tree):
    if torch.is_tensor(tree):
        return full(tree)
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    return [_on_cpu(v) for v in tree] if isinstance(tree, list) else tree


def _restore(state: dict, learner: Learner, policy, value_head, process: int) -> _Run:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _load_trained_weights(state, policy, value_head)
    set_optimizer_state_dict(learner.module, _plain_optimizer(learner), state["optimizer"],
                             options=_whole_tensors())  # fmt: skip
    rng = random.Random()
    rng.setstate(_tuples(state["rng"]))
    _set_process_rng(state["process_rng"][process], next(policy.parameters()).device)
    return _Run(state["step"], KLControllerState(**state["kl"]), rng, list(state["log"]))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def align(
    loaded,
    output: str | Path,
    config: LPPOConfig,
    reward: RewardSource | None = None,
    *,
    method: str = "lppo",
    items: Sequence[Item] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> AlignResult:
    """Align `loaded` (a LoadedModel) at the config's exit layer(s) and write the output folder.

    `loaded.model` is trained in place and ends merged (adapters folded into the language model's weights), except
    under FSDP, where it stays sharded: read the output. Under `accelerate launch` every process calls this with the
    model on its own device (`PartialState().device`; for processes on the CPU, a `PartialState(cpu=True)` made
    first); only the main process writes."""
    from accelerate import Accelerator
    from tqdm import tqdm

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_layers(config, num_exit_layers(loaded.model))
    by_kind = training_items(items)
    reward = reward or JudgeReward()
    accelerator = Accelerator(device_placement=False)  # the caller placed the model
    check_processes(config, accelerator.num_processes, accelerator.distributed_type.value)
    identity = _identity(loaded, config, method, reward.name if method == "lppo" else "-", accelerator.num_processes)
    work = work_dir(output)
    checkpoint = check_output(output, resume=resume, overwrite=overwrite)
    if checkpoint is not None:
        _check_resumable(checkpoint, identity, work)
    accelerator.wait_for_everyone()  # every process has read its checks before anything is written

    # The same LoRA initialisation in every process (FSDP shards each process's own copy), then a sampling stream
    # per process (process 0's is the single-process one).
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, family, tokenizer = loaded.model, loaded.family, loaded.processor.tokenizer
    policy = make_policy(model, config)
    hidden = model.config.get_text_config().hidden_size
    value_head = ValueHead(hidden).to(model.device) if method == "lppo" else None
    sharded = fsdp_requested(accelerator.distributed_type.value)
    if sharded:
        shard(model, value_head, model.device)
    torch.manual_seed(config.seed + accelerator.process_index)
    optimizer = torch.optim.AdamW(trainable(policy, value_head), lr=config.lr, weight_decay=0.0)
    learner = make_learner(policy, value_head, family, optimizer, accelerator, sharded=sharded)
    kl = KLControllerState(config.kl_init, config.kl_target, config.kl_horizon)
    run = _Run(0, kl, random.Random(config.seed), [])
    main = accelerator.is_main_process
    if checkpoint is not None:
        run = _restore(checkpoint, learner, policy, value_head, accelerator.process_index)
    elif work.exists() and main:  # --overwrite: the old run's checkpoint goes
        shutil.rmtree(work)
    resumed_from = run.step if checkpoint is not None else None
    if main:
        work.mkdir(parents=True, exist_ok=True)
    share = config.batch // accelerator.num_processes
    here = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    start = time.time()
    with tqdm(total=config.steps, initial=run.step, desc=f"align ({method})", unit="step", file=sys.stderr,
              disable=not (progress and main)) as bar:  # fmt: skip
        while run.step < config.steps:
            # Every process draws the same layer and items from the same stream, and rolls out its own slice.
            layer = choose_exit_layer(run.rng, config)
            items_here = sample_items(run.rng, by_kind, config.batch)[here]
            batch = prepare_batch(model, family, loaded.processor, items_here, layer)
            if method == "lppo":
                # The unwrapped policy: generation and the reference (adapters disabled) train nothing.
                roll = collect(policy, family, tokenizer, batch, reward, value_head,
                               max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               top_k=config.top_k, synced=sharded)  # fmt: skip
                stats, run.kl = ppo_step(learner, roll, run.kl, config)
                bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.4f}")
            else:
                stats = sft_step(learner, tokenizer, batch, config)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            run.step += 1
            run.log.append({"step": run.step, "exit_layer": layer, **stats})
            bar.update(1)
            if config.checkpoint_every and (run.step % config.checkpoint_every == 0 or run.step == config.steps):
                state = _state(run, learner, policy, value_head, identity)
                if main:
                    write_checkpoint(work, state)
    if sharded:  # the output is written from whole weights: a replica of the model in the main process
        trained = _trained_weights(policy, value_head)  # every process takes part in gathering them
        if main:
            loaded, policy, value_head = _replica(loaded, config, trained)
    if main:
        with atomic_dir(output, overwrite=overwrite) as tmp:
            seconds = round(time.time() - start, 1)
            summary = _summary(run.log, method) | {"resumed_from": resumed_from, "seconds_this_run": seconds}
            write_output(tmp, loaded, policy, value_head, run.log, identity, summary)
        shutil.rmtree(work, ignore_errors=True)
    elif not sharded:
        policy.merge_and_unload()
    accelerator.wait_for_everyone()  # every process returns once the output is there
    return AlignResult(Path(output), method, config.steps, tuple(r["exit_layer"] for r in run.log), resumed_from,
                       run.log[-1])  # fmt: skip


def _replica(loaded, config: LPPOConfig, trained: dict):
    """An unsharded copy of the aligned policy on the CPU: the base model read again, with the trained weights."""
    from edgekit.model.loading import load

    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    replica = load(loaded.source, dtype=dtype, revision=loaded.revision)
    policy = make_policy(replica.model, config)
    hidden = replica.model.config.get_text_config().hidden_size
    value_head = ValueHead(hidden) if trained["value_head"] is not None else None
    _load_trained_weights(trained, policy, value_head)
    return replica, policy, value_head


# --- outputs ---------------------------------------------------------------------------------------------------


def _summary(log: list[dict], method: str) -> dict[str, Any]:
    key = "reward_mean" if method == "lppo" else "loss"
    span = max(1, len(log) // 4)
    mean = lambda rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"steps": len(log), f"{key}_first_quarter": mean(log[:span]), f"{key}_last_quarter": mean(log[-span:]),
            "exit_layers_used": sorted({r["exit_layer"] for r in log}), "last": log[-1]}  # fmt: skip


def write_output(tmp: Path, loaded, policy, value_head, log: list[dict], identity: dict, summary: dict) -> None:
    """adapter/, merged/ (a plain HF checkpoint), value_head.pt (L-PPO), train_log.jsonl, train_curves.png,
    align.json."""
    policy.save_pretrained(tmp / "adapter")
    if value_head is not None:
        torch.save(value_head.state_dict(), tmp / "value_head.pt")
    (tmp / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    plot_curves(log, tmp / "train_curves.png", title=f"{identity['method']} on {Path(identity['model']).name}")
    trainable_count = sum(p.numel() for p in trainable(policy, value_head))
    merged = policy.merge_and_unload()
    merged.save_pretrained(tmp / "merged", safe_serialization=True)
    loaded.processor.save_pretrained(tmp / "merged")
    sentencepiece = Path(loaded.source) / "tokenizer.model"
    if sentencepiece.is_file():  # real LLaVA repos ship it beside tokenizer.json; keep the layout
        shutil.copy(sentencepiece, tmp / "merged" / "tokenizer.model")
    settings = identity["config"]
    lora = {"r": settings["lora_r"], "alpha": settings["lora_alpha"], "target_modules": LORA_TARGETS}
    record = identity | {
        "revision": loaded.revision, "lora": lora, "trainable_parameters": trainable_count, "summary": summary,
    }  # fmt: skip
    (tmp / "align.json").write_text(json.dumps(record, indent=2))


def plot_curves(log: list[dict], path: Path, *, title: str) -> None:
    """Reward and KL against step (L-PPO), or the loss (SFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward_mean", "mean reward"), ("kl", "KL to reference")] if "kl" in log[0] else [("loss", "SFT loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    steps = [r["step"] for r in log]
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(steps, [r[key] for r in log], marker="o" if len(log) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
