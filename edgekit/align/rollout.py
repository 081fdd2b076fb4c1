"""Rollouts for layer-wise alignment: prompts conditioned on exit-layer features, batched generation, and the
log-probabilities and values of response tokens under the policy and the reference policy.

One forward of the vision tower per batch gives the exit layer's projected features (`Family.features_per_layer`,
no grad); every later use (generation, the policy and reference forwards, every PPO epoch and minibatch) reuses them.
The reference policy is the same model with its LoRA adapters disabled: no second copy of the weights exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgekit.safety.scan import chat_inputs
from edgekit.safety.suite import Item


class ValueHead(nn.Module):
    """V(state) = a linear map of the policy's last hidden state; starts at 0 everywhere."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


@dataclass(frozen=True)
class Batch:
    """Prompts of a batch (left-padded) with their exit-layer features, split per row so any rows can be taken."""

    items: tuple[Item, ...]
    exit_layer: int
    inputs: dict[str, Tensor]  # input_ids, attention_mask and other per-token tensors, each [B, P, ...]
    row_features: tuple[Tensor, ...]  # row i's features, no grad

    def rows(self, index: Sequence[int] | Tensor) -> Batch:
        index = [int(i) for i in index]
        picked = torch.tensor(index, device=self.inputs["input_ids"].device)
        return Batch(
            tuple(self.items[i] for i in index),
            self.exit_layer,
            {k: v[picked] for k, v in self.inputs.items()},
            tuple(self.row_features[i] for i in index),
        )

    def features(self) -> Tensor:
        return torch.cat(self.row_features)


@dataclass(frozen=True)
class Responses:
    ids: Tensor  # [B, T] response tokens, pad after the end
    mask: Tensor  # [B, T] bool: the tokens up to and including the first eos
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Rollout:
    batch: Batch
    responses: Responses
    scores: Tensor  # [B] reward of each whole response
    logp: Tensor  # [B, T] log-probs of the response tokens under the policy that sampled them
    ref_logp: Tensor  # [B, T] the same under the reference policy (adapters disabled)
    values: Tensor  # [B, T] value-head estimates at each response token


def prepare_batch(model, family, processor, items: Sequence[Item], exit_layer: int) -> Batch:
    """Processor-built prompts and layer-k features from one forward of the frozen vision tower."""
    inputs = {name: value.to(model.device) for name, value in chat_inputs(processor, items).items()}
    with torch.no_grad():
        features = family.features_per_layer(model, inputs, [exit_layer])[exit_layer]
    image_inputs = set(family.image_inputs)
    size = inputs["input_ids"].shape
    text_inputs = {
        k: v for k, v in inputs.items() if k not in image_inputs and torch.is_tensor(v) and v.shape[:2] == size
    }
    return Batch(tuple(items), exit_layer, text_inputs, _split_rows(model, family, text_inputs["input_ids"], features))


def _split_rows(model, family, input_ids: Tensor, features: Tensor) -> tuple[Tensor, ...]:
    """Per-row pieces of a batch's features. Features that fill image tokens ([n_image_tokens, d], whose rows may
    hold different numbers) split by each row's image-token count; cross-attention states (a leading per-image
    dimension, one image per row here) split evenly."""
    if not family.cross_attention:
        counts = (input_ids == family.image_token_id(model.config)).sum(dim=1).tolist()
        return tuple(torch.split(features, counts))
    return tuple(torch.chunk(features, input_ids.shape[0]))


def special_ids_to_suppress(tokenizer, image_token_id: int | None) -> list[int]:
    """Every special token but eos, and the image token: a response is text that may end."""
    ids = set(tokenizer.all_special_ids) | ({image_token_id} if image_token_id is not None else set())
    return sorted(ids - {tokenizer.eos_token_id})


def response_mask(ids: Tensor, eos_id: int) -> Tensor:
    """True on each row's tokens up to and including its first eos (all tokens if none)."""
    is_eos = (ids == eos_id).int()
    before = is_eos.cumsum(dim=1) - is_eos  # eos tokens strictly before each position
    return before == 0


@torch.no_grad()
def generate(
    model,
    family,
    tokenizer,
    batch: Batch,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    synced: bool = False,
) -> Responses:
    """Batched generation with the KV cache: sampled at `temperature` (top-k if > 0), greedy at temperature 0.
    `synced`: every process decodes until all are done (a sharded model's forward is a collective)."""
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": 1.0}
    new = family.generate(
        model,
        family.lm_inputs(model, batch.inputs, batch.features()),
        max_new_tokens=max_new_tokens,
        **(sampling if temperature > 0 else {"do_sample": False}),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced,
        suppress_tokens=special_ids_to_suppress(tokenizer, family.image_token_id(model.config)),
    )
    mask = response_mask(new, tokenizer.eos_token_id)
    ids = torch.where(mask, new, tokenizer.pad_token_id)
    return Responses(ids, mask, tuple(tokenizer.batch_decode(ids, skip_special_tokens=True)))


def _with_response(inputs: dict[str, Tensor], ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Prompt inputs extended by the response: per-token tensors other than ids and mask repeat their last step,
    as generate() extends them."""
    attention = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], dim=1)
    out = {"input_ids": torch.cat([inputs["input_ids"], ids], dim=1), "attention_mask": attention}
    for name, value in inputs.items():
        if name not in out:
            last = value[:, -1:]
            out[name] = torch.cat([value, last.expand(-1, ids.shape[1], *last.shape[2:])], dim=1)
    return out


def sequence_forward(
    model, family, batch: Batch, ids: Tensor, mask: Tensor, *, temperature: float = 1.0, value_head=None
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [B, T] of response tokens `ids` given the batch's prompts and features (logits divided by the
    sampling temperature, as the sampler saw them), and the value head's estimates [B, T] if given.

    Position t's value is read where token t's logits are: the state before token t is chosen."""
    full = _with_response(batch.inputs, ids, mask)
    lm = family.lm_inputs(model, full, batch.features())
    positions = (full["attention_mask"].long().cumsum(dim=1) - 1).clamp(min=0)
    # Logits of the last T + 1 positions only (the image tokens alone are 576 positions in LLaVA-1.5): the first T
    # of them predict the response tokens.
    out = model(
        **lm,
        position_ids=positions,
        use_cache=False,
        output_hidden_states=value_head is not None,
        logits_to_keep=ids.shape[1] + 1,
    )
    start = batch.inputs["input_ids"].shape[1] - 1
    logits = out.logits[:, : ids.shape[1]].float()
    if temperature > 0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, start : start + ids.shape[1]]).float()
    return logp, values


def collect(
    policy,
    family,
    tokenizer,
    batch: Batch,
    reward,
    value_head,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    synced: bool = False,
) -> Rollout:
    """Generate with the policy, score the responses, and record policy/reference log-probs and values."""
    model = policy.get_base_model()  # LoRA layers live inside it; calling it runs the adapters
    responses = generate(
        model,
        family,
        tokenizer,
        batch,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        synced=synced,
    )
    scores = reward.score([item.prompt for item in batch.items], list(responses.texts), batch.items)
    with torch.no_grad():
        logp, values = sequence_forward(
            model, family, batch, responses.ids, responses.mask, temperature=temperature, value_head=value_head
        )
        with policy.disable_adapter():
            ref_logp, _ = sequence_forward(model, family, batch, responses.ids, responses.mask, temperature=temperature)
    return Rollout(batch, responses, scores.to(logp.device, torch.float32), logp, ref_logp, values)
