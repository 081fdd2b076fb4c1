"""The trained policy and how a step updates it.

The policy is the VLM with LoRA adapters on the language model's attention and MLP projections; the vision tower and
projector stay frozen. The reference policy is the same model with its adapters disabled, so no second copy of the
weights exists. A `Learner` holds the policy and its value head as one module, wrapped by accelerate (DDP) or sharded
(FSDP2), with the optimizer that updates them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from edgekit.align.config import LPPOConfig
from edgekit.align.rollout import Batch, ValueHead, sequence_forward
from edgekit.machine import release_freed_memory

# The language model's projections only: the vision tower has q/k/v projections too, and must stay frozen.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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
            return sequence_forward(
                self.policy.get_base_model(),
                self.family,
                batch,
                ids,
                mask,
                temperature=temperature,
                value_head=self.value_head,
            )


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


def unwrapped_optimizer(learner: Learner):
    return getattr(learner.optimizer, "optimizer", learner.optimizer)  # accelerate wraps it under DDP


def optimizer_step(learner: Learner, loss: torch.Tensor, max_grad_norm: float) -> None:
    """Backward, gradient clipping and one optimizer update."""
    learner.optimizer.zero_grad(set_to_none=True)
    learner.accelerator.backward(loss)
    learner.accelerator.clip_grad_norm_(learner.module.parameters(), max_grad_norm)  # frozen ones have no gradient
    learner.optimizer.step()
    # each recomputed layer leaves holes (benchmarks/align_memory.py); a collection per update would cost 0.1 s
    release_freed_memory(collect=False)
