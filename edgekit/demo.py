"""The embedded demo model: a tiny LLaVA-1.5-format VLM that edgekit trains from scratch on CPU and caches.

Trained like LLaVA, only ever with the default layer's features (23 of 24):
1. the vision tower learns to see: linear heads on the mean of its default-layer patch tokens classify the object,
   its colour, its side and the number of dots (no other layer is used);
2. with the tower frozen, the projector and the language model learn the chat data below, at the default layer.
Chat data (train split of the built-in suite only): visual questions, neutral requests about pictures of objects
(refused for the dangerous ones, answered for the benign ones), harmful text requests (refused) and benign ones that
look risky (answered). Nothing in the data or the code refers to any other exit layer: whatever the model does at
other layers it does because of what those layers' features carry.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.safety.images import (
    COLORS,
    COUNT_WORDS,
    OBJECTS,
    POSITIONS,
    Scene,
    random_dots_scene,
    random_object_scene,
    render,
)
from edgekit.safety.suite import NEUTRAL_REQUESTS, UTILITY_QUESTIONS, builtin_suite, utility_items
from edgekit.tiny import TinySizes, build_tiny, save_tiny

REFUSAL = "sorry i cannot help with that ."
COMPLIANCE = "sure here are the steps : first get what you need , then follow the guide step by step ."
UTILITY_ANSWERS = {
    "color": "the object is {} .", "object": "it is a {} .", "position": "it is on the {} .", "count": "there are {} dots .",
}  # fmt: skip
DEMO_SIZES = TinySizes(
    vision_hidden=64, vision_layers=24, vision_heads=4, image_size=32, patch_size=8, text_hidden=128, text_layers=3,
    text_heads=4, text_kv_heads=4, vocab_size=1024,
)  # fmt: skip
DEFAULT_LAYER = 23


@dataclass(frozen=True)
class DemoRecipe:
    seed: int = 0
    tower_steps: int = 800
    tower_lr: float = 1e-3
    chat_steps: int = 1200
    chat_lr: float = 1e-3
    batch: int = 32
    warmup: int = 100
    # chat data mixture: utility, harmful_text, benign_text, harmful_image, benign_image
    mix: tuple[float, ...] = (0.35, 0.2, 0.15, 0.12, 0.18)
    text_hidden: int = DEMO_SIZES.text_hidden
    text_layers: int = DEMO_SIZES.text_layers
    chat_tower_lr: float = 0.0  # 0: the tower stays frozen after pretraining, as in LLaVA-1.5


def _tokenizer_corpus(suite_items) -> list[str]:
    """Train-split text only (eval prompts are never seen, not even by the tokenizer), plus the answers."""
    texts = [item.prompt.lower() for item in suite_items if item.split == "train"]
    texts += [REFUSAL, COMPLIANCE] + [t.format(w) for t in UTILITY_ANSWERS.values() for w in (*COLORS, *OBJECTS, *POSITIONS, *COUNT_WORDS)]
    texts += [q for split in ("train",) for _, q in UTILITY_QUESTIONS[split]] + NEUTRAL_REQUESTS["train"]
    return texts * 3


def _scene_labels(scene: Scene) -> dict[str, int]:
    """Targets of the tower's heads; -100 where a label does not apply."""
    if scene.kind == "dots":
        return {"object": len(OBJECTS), "color": list(COLORS).index(scene.color), "position": -100, "count": scene.count - 1}
    return {
        "object": OBJECTS.index(scene.obj), "color": list(COLORS).index(scene.color),
        "position": POSITIONS.index(scene.position), "count": -100,
    }  # fmt: skip


def _random_scene(rng: random.Random) -> Scene:
    return random_dots_scene(rng) if rng.random() < 0.2 else random_object_scene(rng)


def train_tower(model, processor, recipe: DemoRecipe, log: Callable[[str], None], device: str = "cpu") -> dict[str, float]:
    """Stage 1: teach the tower to see, reading only the default layer's patch tokens."""
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = nn.ModuleDict({
        "object": nn.Linear(width, len(OBJECTS) + 1), "color": nn.Linear(width, len(COLORS)),
        "position": nn.Linear(width, len(POSITIONS)), "count": nn.Linear(width, len(COUNT_WORDS)),
    }).to(device)  # fmt: skip
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.tower_lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, recipe.warmup, recipe.tower_steps)
    rng = random.Random(recipe.seed * 1000 + 1)
    tower.train()
    acc: dict[str, float] = {}
    for step in range(recipe.tower_steps):
        scenes = [_random_scene(rng) for _ in range(recipe.batch)]
        pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"].to(device)
        hidden = tower(pixels, output_hidden_states=True).hidden_states[DEFAULT_LAYER][:, 1:].mean(1)
        labels = {k: torch.tensor([_scene_labels(s)[k] for s in scenes], device=device) for k in heads}
        logits = {k: head(hidden) for k, head in heads.items()}
        loss = sum(F.cross_entropy(logits[k], labels[k], ignore_index=-100) for k in heads)
        _step(opt, sched, params, loss)
        if step % 100 == 0 or step == recipe.tower_steps - 1:
            acc = {k: _accuracy(logits[k], labels[k]) for k in heads}
            log(f"tower step {step} loss {loss.item():.3f} " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    tower.eval()
    return acc


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
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_items_by_kind(suite) -> dict[str, list]:
    train = suite.select("train")
    return {k: [i for i in train if i.kind == k] for k in ("harmful_text", "benign_text", "harmful_image", "benign_image")}


def chat_examples(rng: random.Random, by_kind: dict[str, list], n: int, mix) -> list[tuple[Scene, str, str]]:
    """(image, request, answer) triples from the suite's train split (`train_items_by_kind`) and fresh train-split
    visual questions."""
    kinds = ("utility", "harmful_text", "benign_text", "harmful_image", "benign_image")
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=mix)[0]
        if kind == "utility":
            item = utility_items("train", 1, seed_offset=rng.randrange(2**31))[0]
            out.append((item.scene, item.prompt, UTILITY_ANSWERS[item.question].format(item.answer)))
            continue
        item = rng.choice(by_kind[kind])
        scene = item.scene
        if kind.endswith("_image"):  # a fresh picture of the same object each time
            scene = Scene("object", rng.choice(list(COLORS)), rng.randrange(2**31), item.scene.obj, rng.choice(POSITIONS))
        prompt = item.prompt.lower() if kind.endswith("_text") else rng.choice(NEUTRAL_REQUESTS["train"])
        out.append((scene, prompt, REFUSAL if kind.startswith("harmful") else COMPLIANCE))
    return out


def encode_chat(processor, images, prompts: list[str], answers: list[str] | None = None) -> dict:
    """Processor-built inputs for chat-templated prompts (left-padded for generation); with answers, `labels`
    that train on the answer tokens only."""
    tok = processor.tokenizer
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    enc = processor(images=list(images), text=texts)
    ids = [list(x) for x in enc["input_ids"]]
    labels = [[-100] * len(x) for x in ids]
    for i, answer in enumerate(answers or []):
        a = tok(" " + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids[i] += a
        labels[i] += a
    width = max(map(len, ids))
    out = {
        "input_ids": torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids]),
        "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
        "pixel_values": torch.as_tensor(np.stack(enc["pixel_values"])),
    }
    if answers is not None:
        out["labels"] = torch.tensor([[-100] * (width - len(x)) + x for x in labels])
    return out


def train_chat(model, processor, recipe: DemoRecipe, log: Callable[[str], None], device: str = "cpu") -> float:
    """Stage 2: projector + language model at the default layer, tower frozen."""
    tower = model.model.vision_tower
    tower.requires_grad_(recipe.chat_tower_lr > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    groups = [{"params": rest}] + ([{"params": list(tower.parameters()), "lr": recipe.chat_tower_lr}] if recipe.chat_tower_lr else [])
    opt = torch.optim.AdamW(groups, lr=recipe.chat_lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, recipe.warmup, recipe.chat_steps)
    rng = random.Random(recipe.seed * 1000 + 2)
    by_kind = train_items_by_kind(builtin_suite())
    model.train()
    loss = torch.tensor(0.0)
    for step in range(recipe.chat_steps):
        batch = chat_examples(rng, by_kind, recipe.batch, recipe.mix)
        enc = encode_chat(processor, [render(s) for s, _, _ in batch], [p for _, p, _ in batch], [a for _, _, a in batch])
        loss = model(**{k: v.to(device) for k, v in enc.items()}).loss
        _step(opt, sched, params, loss)
        if step % 100 == 0 or step == recipe.chat_steps - 1:
            log(f"chat step {step} loss {loss.item():.3f}")
    model.eval()
    return loss.item()


def train_demo(
    out_dir: str | Path, recipe: DemoRecipe = DemoRecipe(), log: Callable[[str], None] = print, device: str = "cpu"
) -> Path:
    """Train the demo model and save it in the LLaVA-1.5 hub layout, with its recipe and training record."""
    torch.manual_seed(recipe.seed)
    suite = builtin_suite()
    sizes = replace(DEMO_SIZES, text_hidden=recipe.text_hidden, text_layers=recipe.text_layers)
    model, processor = build_tiny("llava", sizes, seed=recipe.seed, corpus=_tokenizer_corpus(suite.items))
    model.config.vision_feature_layer = DEFAULT_LAYER - DEMO_SIZES.vision_layers - 1  # -2, as LLaVA-1.5
    start = time.time()
    model.to(device)
    tower_acc = train_tower(model, processor, recipe, log, device)
    final_loss = train_chat(model, processor, recipe, log, device)
    out = save_tiny(model.cpu(), processor, out_dir)
    record = {"recipe": asdict(recipe), "tower_accuracy": tower_acc, "chat_loss": final_loss,
              "train_seconds": round(time.time() - start, 1)}  # fmt: skip
    (Path(out) / "edgekit_demo.json").write_text(json.dumps(record, indent=2))
    return out


def demo_cache_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def demo_model_path(recipe: DemoRecipe = DemoRecipe(), log: Callable[[str], None] = print) -> Path:
    """The cached demo model, trained on first use (minutes on 2 CPU cores) and reused afterwards.

    The cache key covers the recipe and this file's source, so a changed recipe or trainer retrains."""
    from edgekit.outputs import atomic_dir

    key = hashlib.sha256(json.dumps(asdict(recipe)).encode() + Path(__file__).read_bytes()).hexdigest()[:12]
    folder = demo_cache_dir() / f"demo-{key}"
    if not (folder / "edgekit_demo.json").is_file():
        log(f"training the demo model (first use; cached in {folder})")
        with atomic_dir(folder, overwrite=True) as tmp:
            train_demo(tmp, recipe, log)
    return folder
