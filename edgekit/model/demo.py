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
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from edgekit.model.demo_data import (
    DESCRIBE,
    TEXT_MIX,
    ScenePool,
    WordNoise,
    caption,
    chat_examples,
    encode_chat,
    text_examples,
    tokenizer_corpus,
    train_requests,
)
from edgekit.model.demo_tower import DEFAULT_LAYER, scene_pool, train_tower
from edgekit.model.families import family_for
from edgekit.model.tiny import TinySizes, build_tiny, save_tiny
from edgekit.model.train_steps import PartLoss, adamw, one_core_per_part, split, train_step, warmup_cosine
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
    # each step's batch in this many parts, each in a thread on one core (1 = torch's own threads): three quarters of
    # the time on two cores, and what is trained no longer depends on the machine's cores (`edgekit.model.train_steps`)
    batch_parts: int = 1
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
    # text requests trained as written, capitals included (False: lowercased, as every recipe until round 31): the
    # suite asks as written, so a lowercase model meets its first words as untrained byte pieces (`as_trained`)
    cased: bool = False
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


def _language_model(model) -> tuple[nn.Module, nn.Module]:
    """The language model and its head: what stage 0 trains alone, stage 1 freezes and `chat_lm_lr` paces."""
    return model.model.language_model, model.lm_head


def _text_loss(model, processor, pairs: list[tuple[str, str]], device: str) -> torch.Tensor:
    enc = {k: v.to(device) for k, v in encode_chat(processor, None, *map(list, zip(*pairs))).items()}
    return model(**enc).loss


def train_text_lm(model, processor, recipe: DemoRecipe, log: Callable[[str], None], device: str = "cpu") -> float:
    """Stage 0 (LLaVA's pipeline): the language model alone, text-only chat, before it sees any picture."""
    lm = [p for module in _language_model(model) for p in module.parameters()]
    opt = adamw(lm, recipe.text_lr, recipe.batch_parts)
    sched = warmup_cosine(opt, recipe.warmup, recipe.text_steps)
    rng, by_kind = random.Random(recipe.seed * 1000 + 4), train_requests(builtin_suite(), recipe.cased)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(recipe.text_steps):
        pairs = _text_batch(rng, by_kind, recipe.batch, recipe)
        parts = _shares(lambda b: _text_loss(model, processor, b, device), pairs, recipe)
        loss, _ = train_step(opt, sched, lm, parts, recipe.batch_parts)
        if step % 100 == 0 or step == recipe.text_steps - 1:
            log(f"text step {step} loss {loss.item():.3f}")
    model.eval()
    return loss.item()


def _shares(loss: Callable[[list], torch.Tensor], examples: list, recipe: DemoRecipe) -> list[PartLoss]:
    """`examples` in `batch_parts` parts, each part's loss (a mean over its answer tokens) weighted by its share of the
    step's `batch` examples, so that the shares add up to the batch's loss."""

    def part(rows: slice) -> PartLoss:
        return lambda: (loss(examples[rows]) * ((rows.stop - rows.start) / recipe.batch), None)

    return [part(rows) for rows in split(len(examples), recipe.batch_parts)]


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
    opt = adamw(params, recipe.chat_lr, recipe.batch_parts)
    sched = warmup_cosine(opt, recipe.warmup, recipe.projector_steps)
    rng = random.Random(recipe.seed * 1000 + 3)
    lm = _language_model(model)
    for module in lm:
        module.requires_grad_(False)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(recipe.projector_steps):
        picked = [rng.randrange(len(pool.scenes)) for _ in range(recipe.batch)]
        batch = [(i, DESCRIBE, caption(pool.scenes[i])) for i in picked]
        parts = _shares(lambda b: _image_loss(model, processor, pool, b, device), batch, recipe)
        loss, _ = train_step(opt, sched, params, parts, recipe.batch_parts)
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
    opt = adamw(_chat_groups(model, recipe, params), recipe.chat_lr, recipe.batch_parts)
    sched = warmup_cosine(opt, recipe.warmup, recipe.chat_steps)
    by_kind = train_requests(builtin_suite(), recipe.cased)
    replay_rng, n_text = random.Random(recipe.seed * 1000 + 5), round(recipe.batch * recipe.replay)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(recipe.chat_steps):
        batch = chat_examples(rng, by_kind, pool, recipe.batch - n_text, recipe.mix, _noise(recipe))
        parts = _shares(lambda b: _image_loss(model, processor, pool, b, device), batch, recipe)
        if n_text:
            text = _text_batch(replay_rng, by_kind, n_text, recipe)
            parts += _shares(lambda b: _text_loss(model, processor, b, device), text, recipe)
        loss, _ = train_step(opt, sched, params, parts, recipe.batch_parts)
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
    "batch_parts",
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
    corpus = tokenizer_corpus(suite.items, captions=llava_pipeline, cased=recipe.cased)
    model, processor = build_tiny("llava", sizes, seed=recipe.seed, corpus=corpus)
    model.config.vision_feature_layer = DEFAULT_LAYER - DEMO_SIZES.vision_layers - 1  # -2, as LLaVA-1.5
    if recipe.tower_common:
        bias = model.model.vision_tower.pre_layrnorm.bias
        direction = torch.randn(bias.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            bias.copy_(direction / direction.norm() * recipe.tower_common)
    start = time.time()
    model.to(device)
    with one_core_per_part(recipe.batch_parts):
        if tower_from:
            tower_acc = reuse_tower(model, recipe, Path(tower_from))
        else:
            tower_acc = train_tower(model, processor, recipe, log, device)
        model.model.vision_tower.requires_grad_(False)  # frozen from here on, as in LLaVA
        rng = random.Random(recipe.seed * 1000 + 2)
        pool = scene_pool(model, processor, rng, recipe.pool, device, recipe.batch_parts)
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
        "trained_on": trained_on(),
    }
    (Path(out) / "edgekit_demo.json").write_text(json.dumps(record, indent=2))
    return out


def trained_on() -> dict[str, str]:
    """What decides the weights besides the recipe and the source. Training is bit for bit on one kind of CPU and one
    set of libraries, not across them: torch's kernels, MKL and oneDNN each pick code by instruction set and return
    other sums, which thousands of steps make another draw of the model; pillow draws its pictures."""
    from importlib.metadata import version

    packages = {p: version(p) for p in ("torch", "transformers", "pillow", "numpy")}
    return {"cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(), **packages}


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
    from edgekit.model import demo_data, demo_tower, train_steps
    from edgekit.outputs import atomic_dir
    from edgekit.safety import images

    trainer = (__file__, demo_tower.__file__, train_steps.__file__, demo_data.__file__, images.__file__)
    source = b"".join(Path(f).read_bytes() for f in trainer)
    suite = repr(builtin_suite().items).encode()
    key = hashlib.sha256(json.dumps(asdict(recipe)).encode() + source + suite).hexdigest()[:12]
    folder = demo_cache_dir() / f"demo-{key}"
    if not (folder / "edgekit_demo.json").is_file():
        log(f"training the demo model (first use; cached in {folder})")
        with atomic_dir(folder, overwrite=True) as tmp:
            train_demo(tmp, recipe, log)
    return folder
