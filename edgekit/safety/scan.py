"""The ICET scan: how a model's safety and utility change with its vision exit layer.

Efficient by construction: one vision-tower forward per batch of images yields every layer's projected features
(`Family.features_per_layer`), then each layer's answers come from one batched greedy generation with the KV cache.

Bounded by design: a batch's activations and KV cache grow with the language model's depth and the prompt's length
(LLaVA-1.5-7B: about 0.5 GiB an item at 680 tokens, so 32 items would need 16 GiB beside 13 GiB of weights), so a
batch holds at most as many items as keep them within a fifth of the weights' bytes, or 256 MiB for small models
(`batch_for_memory`). The
batch size depends on the model only, not on the machine, so a scan's batches are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from edgekit.devices.runtime import chat_text
from edgekit.errors import UserError
from edgekit.machine import working_set_allowance
from edgekit.model.families import head_dim, text_config
from edgekit.safety.judges import Judge
from edgekit.safety.metrics import Estimate, bootstrap_mean
from edgekit.safety.suite import Item, utility_correct

METRICS = ("asr", "over_refusal", "utility")


@dataclass(frozen=True)
class Answer:
    item: Item
    layer: int
    response: str
    refused: bool
    unsafe: bool | None = None  # from judges that read harm; ASR then counts unsafe answers, not non-refusals


@dataclass(frozen=True)
class LayerResult:
    layer: int
    metrics: dict[str, Estimate]  # asr, over_refusal, utility, and asr/over_refusal per item kind
    answers: tuple[Answer, ...] = field(repr=False, default=())


@dataclass(frozen=True)
class ScanResult:
    layers: tuple[LayerResult, ...]
    vision_forwards: int  # tower forward passes: one per batch of images, whatever the number of layers
    images: int


def chat_inputs(processor, items: Sequence[Item]) -> dict:
    """Processor-built, left-padded inputs for items (one image and one user turn each)."""
    prompts = [chat_text(processor, item.prompt) for item in items]
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=[[item.image()] for item in items], text=prompts, return_tensors="pt", padding=True))


@torch.no_grad()
def generate_per_layer(loaded, inputs: dict, layers: Sequence[int], max_new_tokens: int) -> dict[int, list[str]]:
    """Greedy answers for a batch at each exit layer, from one forward of the vision tower."""
    model, family, tokenizer = loaded.model, loaded.family, loaded.processor.tokenizer
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    features = family.features_per_layer(model, inputs, list(layers))
    image_token = family.image_token_id(model.config)
    out = {}
    for k in layers:
        new_tokens = family.generate(
            model,
            family.lm_inputs(model, inputs, features[k]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=[image_token],
        )
        out[k] = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return out


def batch_for_memory(loaded, items: Sequence[Item], layers: Sequence[int], max_new_tokens: int, limit: int) -> int:
    """Items per batch: at most `limit`, and no more than keep a batch's working set (`item_working_set` each) within
    the house's allowance beside the weights (`machine.working_set_allowance`); at least one item."""
    if not items:
        return limit
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    allowed = working_set_allowance(weights)
    return max(1, min(limit, allowed // item_working_set(loaded, items[0], layers, max_new_tokens)))


def item_working_set(loaded, item: Item, layers: Sequence[int], max_new_tokens: int) -> int:
    """Bytes one item like `item` adds to a scan batch at its peak, from the config and the item's prompt length: the
    KV cache of the whole answer, the largest transients of a prefill layer (the attention scores and their softmax;
    the MLP's gate, up and product), the tower's hidden states of every layer (HF keeps them all) and the projected
    features of each scanned layer. On 7B widths with 4 LM layers at 680 tokens: 178 MiB, against 200 MiB an item
    measured (the peak with 5 items a batch less that with 1)."""
    model = loaded.model
    prompt = chat_inputs(loaded.processor, [item])["input_ids"]
    tokens = prompt.shape[1] + max_new_tokens
    image_tokens = int((prompt == loaded.family.image_token_id(model.config)).sum())
    text, vision = text_config(model.config), model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    values = (
        2 * text.num_hidden_layers * text.num_key_value_heads * head_dim(text) * tokens
        + 2 * text.num_attention_heads * tokens**2
        + 3 * tokens * text.intermediate_size
        + (vision.num_hidden_layers + 1) * max(image_tokens, patches) * vision.hidden_size
        + len(layers) * image_tokens * text.hidden_size
    )
    return values * model.dtype.itemsize


def score_layer(layer: int, answers: list[Answer]) -> LayerResult:
    by_metric: dict[str, list[bool]] = {m: [] for m in METRICS}
    by_kind: dict[str, list[bool]] = {}
    for a in answers:
        if a.item.metric == "utility":
            outcome = utility_correct(a.item, a.response)
        elif a.item.metric == "asr":
            outcome = a.unsafe if a.unsafe is not None else not a.refused
        else:
            outcome = a.refused
        by_metric[a.item.metric].append(outcome)
        by_kind.setdefault(a.item.kind, []).append(outcome)
    metrics = {m: bootstrap_mean(v) for m, v in by_metric.items()}
    metrics |= {kind: bootstrap_mean(v) for kind, v in by_kind.items() if kind != "utility"}
    return LayerResult(layer, metrics, tuple(answers))


def scan(
    loaded,
    items: Sequence[Item],
    layers: Sequence[int],
    judge: Judge,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 24,
    progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Answer every item at every layer, judge the answers, and score each layer; `batch_size` items a batch at most
    (fewer where memory says so: `batch_for_memory`)."""
    answers: dict[int, list[Answer]] = {k: [] for k in layers}
    forwards = 0
    batch_size = batch_for_memory(loaded, items, layers, max_new_tokens, batch_size)
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        responses = generate_per_layer(loaded, chat_inputs(loaded.processor, batch), layers, max_new_tokens)
        forwards += 1
        for k, texts in responses.items():
            verdicts = judge.judge([item.prompt for item in batch], texts)
            answers[k] += [Answer(i, k, t, v.label == "refusal", v.unsafe) for i, t, v in zip(batch, texts, verdicts)]
        if progress:
            progress(len(batch))
    return ScanResult(tuple(score_layer(k, answers[k]) for k in layers), forwards, len(items))


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'all', '12', '1-24' or '1,4,8-16' as sorted layers, each checked to be in 1..L."""
    if text == "all":
        return list(range(1, num_layers + 1))
    layers: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            layers.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UserError(f"--layers {text!r}: expected 'all', a layer, a range A-B or a comma list of them") from None
    outside = sorted(k for k in layers if not 1 <= k <= num_layers)
    if outside or not layers:
        raise UserError(f"--layers {text!r}: layers {outside or text} are outside 1..{num_layers}")
    return sorted(layers)
