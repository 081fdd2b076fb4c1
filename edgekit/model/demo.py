"""The embedded demo model: a tiny LLaVA-1.5-format VLM that edgekit trains from scratch on CPU and caches.

Trained like LLaVA, only ever with the default layer's features (23 of 24):
1. the vision tower learns to see: linear heads on the mean of its default-layer patch tokens classify the object,
   its colour, its side and the number of dots (no other layer is used);
2. with the tower frozen, the projector and the language model learn the chat data below, at the default layer.
Chat data (train split of the built-in suite only): visual questions, neutral requests about pictures of objects
(refused for the dangerous ones, answered for the benign ones), harmful text requests (refused) and benign ones that
look risky (answered). Nothing in the data or the code refers to any other exit layer: whatever the model does at
other layers it does because of what those layers' features carry.

The data of every stage is `edgekit.model.demo_data`. A recipe may also follow LLaVA's own pipeline (`text_steps`,
`projector_steps`, `replay`; off in the shipped recipe): the language model trained text-only first, pictures given
as written captions; then the projector alone on captions; then the chat stage with a share of the text-only data
replayed. docs/demo-model-attempts.md records what it gave.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.model.demo_data import (
    DESCRIBE,
    TEXT_MIX,
    ScenePool,
    WordNoise,
    caption,
    chat_examples,
    encode_chat,
    random_scene,
    scene_labels,
    text_examples,
    tokenizer_corpus,
    train_items_by_kind,
)
from edgekit.model.families import family_for
from edgekit.model.tiny import TinySizes, build_tiny, save_tiny
from edgekit.safety.images import (
    COLORS,
    COUNT_WORDS,
    OBJECTS,
    POSITIONS,
    render,
)
from edgekit.safety.suite import builtin_suite

DEMO_SIZES = TinySizes(
    vision_hidden=64,
    vision_layers=24,
    vision_heads=4,
    image_size=32,
    patch_size=8,
    text_hidden=128,
    text_layers=3,
    text_heads=4,
    text_kv_heads=4,
    vocab_size=1024,
)
DEFAULT_LAYER = 23


@dataclass(frozen=True)
class DemoRecipe:
    seed: int = 1
    tower_steps: int = 1500
    tower_lr: float = 1e-3
    chat_steps: int = 1200
    chat_lr: float = 1e-3
    # the language model's learning rate in the chat stage (0 = `chat_lr`): LLaVA-1.5 tunes its language model there
    # at 2e-5 against the projector's 1e-3 in stage 1, so the chat stage adjusts a text model rather than retrains it
    chat_lm_lr: float = 0.0
    batch: int = 32
    # pictures per tower step (0 = `batch`): smaller batches and more steps recognise better for the same seconds
    tower_batch: int = 0
    # the object head's weight in the tower's loss: a short tower stage learns colour, side and count, not objects
    tower_object_weight: float = 1.0
    warmup: int = 100
    # chat data mixture: utility, harmful_text, benign_text, harmful_image, benign_image
    mix: tuple[float, ...] = (0.27, 0.33, 0.12, 0.14, 0.14)
    text_hidden: int = DEMO_SIZES.text_hidden
    text_layers: int = DEMO_SIZES.text_layers
    pool: int = 6000  # training pictures for the chat stage
    patch_size: int = DEMO_SIZES.patch_size  # 8 px: 16 image tokens; 4 px: 64 (three times the tower's cost)
    word_noise: float = 0.1  # chance that each word of a text request is dropped or swapped for a random train word
    made_up_words: float = 0.0  # then the chance that each word is swapped for a made-up one (`WordNoise`)
    noise_neutral: bool = False  # the neutral requests about pictures noised too, among their own words
    # LLaVA's own pipeline (0 = off): the language model trained text-only first, safety included (`text_steps`),
    # then the projector alone on captions (`projector_steps`), then the chat stage with a `replay` share of the
    # text-only data, as LLaVA-1.5 mixes ShareGPT into its visual instruction tuning
    text_steps: int = 0
    text_lr: float = 1e-3
    text_mix: tuple[float, ...] = TEXT_MIX  # stage 0 and replay: harmful_text, benign_text, utility, neutral, describe
    projector_steps: int = 0
    replay: float = 0.0
    # Norm of a common vector every tower token carries from the first layer on (0 = off): the tower's pre-layernorm
    # bias at initialisation, one fixed random direction. Real ViTs carry massive activations like it from their early
    # layers on, so an early exit there keeps the common part and loses contrast; the demo tower otherwise builds its
    # tokens from nothing, and an early exit fades toward what the projector makes of an empty feature.
    tower_common: float = 0.0


def train_tower(
    model, processor, recipe: DemoRecipe, log: Callable[[str], None], device: str = "cpu"
) -> dict[str, float]:
    """Stage 1: teach the tower to see, reading only the default layer's patch tokens."""
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = nn.ModuleDict(
        {
            "object": nn.Linear(width, len(OBJECTS) + 1),
            "color": nn.Linear(width, len(COLORS)),
            "position": nn.Linear(width, len(POSITIONS)),
            "count": nn.Linear(width, len(COUNT_WORDS)),
        }
    ).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.tower_lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, recipe.warmup, recipe.tower_steps)
    weights = {"object": recipe.tower_object_weight}
    rng = random.Random(recipe.seed * 1000 + 1)
    tower.train()
    acc: dict[str, float] = {}
    for step in range(recipe.tower_steps):
        scenes = [random_scene(rng) for _ in range(recipe.tower_batch or recipe.batch)]
        pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"].to(device)
        hidden = tower(pixels, output_hidden_states=True).hidden_states[DEFAULT_LAYER][:, 1:].mean(1)
        labels = {k: torch.tensor([scene_labels(s)[k] for s in scenes], device=device) for k in heads}
        logits = {k: head(hidden) for k, head in heads.items()}
        loss = sum(_head_loss(logits[k], labels[k]) * weights.get(k, 1.0) for k in heads)
        _step(opt, sched, params, loss)
        if step % 100 == 0 or step == recipe.tower_steps - 1:
            acc = {k: _accuracy(logits[k], labels[k]) for k in heads}
            log(f"tower step {step} loss {loss.item():.3f} " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    tower.eval()
    return acc


def _head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pictures a head has labels for, and 0 for a batch with none (a batch without dots
    has no count to learn): the plain mean would be 0/0."""
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def _step(opt, sched, params, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _accuracy(logits, labels) -> float:
    valid = labels != -100
    return float((logits.argmax(-1)[valid] == labels[valid]).float().mean()) if valid.any() else float("nan")


def _warmup_cosine(opt, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def scene_pool(model, processor, rng: random.Random, size: int, device: str = "cpu") -> ScenePool:
    scenes = [random_scene(rng) for _ in range(size)]
    tower = model.model.vision_tower
    chunks = []
    with torch.no_grad():
        for start in range(0, size, 256):
            images = [render(s) for s in scenes[start : start + 256]]
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
            chunks.append(tower(pixels, output_hidden_states=True).hidden_states[DEFAULT_LAYER][:, 1:])
    by_object: dict[str, list[int]] = {}
    for i, s in enumerate(scenes):
        by_object.setdefault(s.obj if s.kind == "object" else "dots", []).append(i)
    return ScenePool(scenes, torch.cat(chunks), by_object)


def _language_model(model) -> tuple[nn.Module, nn.Module]:
    """The language model and its head: what stage 0 trains alone, stage 1 freezes and `chat_lm_lr` paces."""
    return model.model.language_model, model.lm_head


def _text_loss(model, processor, pairs: list[tuple[str, str]], device: str) -> torch.Tensor:
    enc = {k: v.to(device) for k, v in encode_chat(processor, None, *map(list, zip(*pairs))).items()}
    return model(**enc).loss


def train_text_lm(model, processor, recipe: DemoRecipe, log: Callable[[str], None], device: str = "cpu") -> float:
    """Stage 0 (LLaVA's pipeline): the language model alone, text-only chat, before it sees any picture."""
    lm = [p for module in _language_model(model) for p in module.parameters()]
    opt = torch.optim.AdamW(lm, lr=recipe.text_lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, recipe.warmup, recipe.text_steps)
    rng, by_kind = random.Random(recipe.seed * 1000 + 4), train_items_by_kind(builtin_suite())
    model.train()
    loss = torch.tensor(0.0)
    for step in range(recipe.text_steps):
        loss = _text_loss(model, processor, _text_batch(rng, by_kind, recipe.batch, recipe), device)
        _step(opt, sched, lm, loss)
        if step % 100 == 0 or step == recipe.text_steps - 1:
            log(f"text step {step} loss {loss.item():.3f}")
    model.eval()
    return loss.item()


def _text_batch(rng: random.Random, by_kind: dict[str, list], n: int, recipe: DemoRecipe) -> list[tuple[str, str]]:
    return text_examples(rng, by_kind, n, _noise(recipe), recipe.text_mix)


def _noise(recipe: DemoRecipe) -> WordNoise:
    return WordNoise(recipe.word_noise, recipe.made_up_words, recipe.noise_neutral)


def _image_loss(model, processor, pool: ScenePool, batch: list[tuple[int, str, str]], device: str) -> torch.Tensor:
    enc = {
        k: v.to(device)
        for k, v in encode_chat(
            processor, pool.features.shape[1], [p for _, p, _ in batch], [a for _, _, a in batch]
        ).items()
    }
    features = model.model.multi_modal_projector(pool.features[[i for i, _, _ in batch]]).flatten(0, 1)
    return model(**family_for(model.config).lm_inputs(model, enc, features), labels=enc["labels"]).loss


def train_projector(
    model, processor, recipe: DemoRecipe, pool: ScenePool, log: Callable[[str], None], device: str = "cpu"
) -> float:
    """Stage 1 (LLaVA's feature alignment): the projector alone, tower and language model frozen, learns to turn
    the default layer's tokens into what the language model reads as the picture's caption."""
    params = list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.chat_lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, recipe.warmup, recipe.projector_steps)
    rng = random.Random(recipe.seed * 1000 + 3)
    lm = _language_model(model)
    for module in lm:
        module.requires_grad_(False)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(recipe.projector_steps):
        picked = [rng.randrange(len(pool.scenes)) for _ in range(recipe.batch)]
        loss = _image_loss(model, processor, pool, [(i, DESCRIBE, caption(pool.scenes[i])) for i in picked], device)
        _step(opt, sched, params, loss)
        if step % 100 == 0 or step == recipe.projector_steps - 1:
            log(f"projector step {step} loss {loss.item():.3f}")
    for module in lm:
        module.requires_grad_(True)
    model.eval()
    return loss.item()


def train_chat(
    model, processor, recipe: DemoRecipe, pool: ScenePool, rng: random.Random, log, device: str = "cpu"
) -> float:
    """Stage 2: projector + language model at the default layer, tower frozen; a `replay` share of each batch is
    stage 0's text-only data."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(_chat_groups(model, recipe, params), lr=recipe.chat_lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, recipe.warmup, recipe.chat_steps)
    by_kind = train_items_by_kind(builtin_suite())
    replay_rng, n_text = random.Random(recipe.seed * 1000 + 5), round(recipe.batch * recipe.replay)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(recipe.chat_steps):
        batch = chat_examples(rng, by_kind, pool, recipe.batch - n_text, recipe.mix, _noise(recipe))
        loss = _image_loss(model, processor, pool, batch, device)
        if n_text:
            text = _text_loss(model, processor, _text_batch(replay_rng, by_kind, n_text, recipe), device)
            loss = (loss * len(batch) + text * n_text) / recipe.batch
        _step(opt, sched, params, loss)
        if step % 100 == 0 or step == recipe.chat_steps - 1:
            log(f"chat step {step} loss {loss.item():.3f}")
    model.eval()
    return loss.item()


def _chat_groups(model, recipe: DemoRecipe, params: list) -> list:
    """The chat stage's parameters, the language model's in a group of their own when it has its own rate."""
    if not recipe.chat_lm_lr:
        return params
    lm = {id(p) for module in _language_model(model) for p in module.parameters()}
    return [
        {"params": [p for p in params if id(p) not in lm]},
        {"params": [p for p in params if id(p) in lm], "lr": recipe.chat_lm_lr},
    ]


# What the tower stage depends on: a tower trained with the same values is the one any recipe with them would train.
TOWER_FIELDS = (
    "seed",
    "tower_steps",
    "tower_lr",
    "batch",
    "tower_batch",
    "tower_object_weight",
    "warmup",
    "patch_size",
    "tower_common",
)


def train_demo(
    out_dir: str | Path,
    recipe: DemoRecipe = DemoRecipe(),
    log: Callable[[str], None] = print,
    device: str = "cpu",
    tower_from: str | Path | None = None,
) -> Path:
    """Train the demo model and save it in the LLaVA-1.5 hub layout, with its recipe and training record.

    `tower_from`: a demo model trained with the same TOWER_FIELDS, whose frozen tower is reused instead of trained,
    so that a screen of stages 0-2 skips the tower's minutes and gives what the full run would."""
    torch.manual_seed(recipe.seed)
    suite = builtin_suite()
    sizes = replace(
        DEMO_SIZES, text_hidden=recipe.text_hidden, text_layers=recipe.text_layers, patch_size=recipe.patch_size
    )
    llava_pipeline = bool(recipe.text_steps or recipe.projector_steps or recipe.replay)
    corpus = tokenizer_corpus(suite.items, captions=llava_pipeline)
    model, processor = build_tiny("llava", sizes, seed=recipe.seed, corpus=corpus)
    model.config.vision_feature_layer = DEFAULT_LAYER - DEMO_SIZES.vision_layers - 1  # -2, as LLaVA-1.5
    if recipe.tower_common:
        bias = model.model.vision_tower.pre_layrnorm.bias
        direction = torch.randn(bias.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            bias.copy_(direction / direction.norm() * recipe.tower_common)
    start = time.time()
    model.to(device)
    if tower_from:
        tower_acc = reuse_tower(model, recipe, Path(tower_from))
    else:
        tower_acc = train_tower(model, processor, recipe, log, device)
    model.model.vision_tower.requires_grad_(False)  # frozen from here on, as in LLaVA
    rng = random.Random(recipe.seed * 1000 + 2)
    pool = scene_pool(model, processor, rng, recipe.pool, device)
    if recipe.text_steps:
        train_text_lm(model, processor, recipe, log, device)
    if recipe.projector_steps:
        train_projector(model, processor, recipe, pool, log, device)
    final_loss = train_chat(model, processor, recipe, pool, rng, log, device)
    out = save_tiny(model.cpu(), processor, out_dir)
    record = {
        "recipe": asdict(recipe),
        "tower_from": str(tower_from) if tower_from else None,
        "tower_accuracy": tower_acc,
        "chat_loss": final_loss,
        "train_seconds": round(time.time() - start, 1),
    }
    (Path(out) / "edgekit_demo.json").write_text(json.dumps(record, indent=2))
    return out


def reuse_tower(model, recipe: DemoRecipe, source: Path) -> dict[str, float]:
    """Load the trained tower of the demo model in `source` into `model`; its record's accuracies come with it."""
    record = json.loads((source / "edgekit_demo.json").read_text())
    defaults, wanted = asdict(DemoRecipe()), asdict(recipe)
    differ = [f for f in TOWER_FIELDS if record["recipe"].get(f, defaults[f]) != wanted[f]]
    if differ:
        raise ValueError(f"{source} trained its tower with other {', '.join(differ)}: it is not this recipe's tower")
    trained = type(model).from_pretrained(source, torch_dtype=torch.float32)
    model.model.vision_tower.load_state_dict(trained.model.vision_tower.state_dict())
    return record["tower_accuracy"]


def demo_cache_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def demo_model_path(recipe: DemoRecipe = DemoRecipe(), log: Callable[[str], None] = print) -> Path:
    """The cached demo model, trained on first use (minutes on 2 CPU cores) and reused afterwards.

    The cache key covers the recipe, the source of the trainer, its data and the pictures, and the built-in suite's
    items themselves (its prompts live in data files), so a change to any retrains."""
    from edgekit.model import demo_data
    from edgekit.outputs import atomic_dir
    from edgekit.safety import images

    source = b"".join(Path(f).read_bytes() for f in (__file__, demo_data.__file__, images.__file__))
    suite = repr(builtin_suite().items).encode()
    key = hashlib.sha256(json.dumps(asdict(recipe)).encode() + source + suite).hexdigest()[:12]
    folder = demo_cache_dir() / f"demo-{key}"
    if not (folder / "edgekit_demo.json").is_file():
        log(f"training the demo model (first use; cached in {folder})")
        with atomic_dir(folder, overwrite=True) as tmp:
            train_demo(tmp, recipe, log)
    return folder
