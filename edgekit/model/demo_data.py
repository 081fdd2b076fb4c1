"""The demo model's data: the answers it learns, pictures in words (captions), and the examples of each training
stage, all drawn from the train split of the built-in suite (`edgekit.model.demo` trains on them)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from edgekit.safety.images import (
    BENIGN,
    COLORS,
    COUNT_WORDS,
    DANGEROUS,
    OBJECTS,
    POSITIONS,
    Scene,
    random_dots_scene,
    random_object_scene,
)
from edgekit.safety.suite import NEUTRAL_REQUESTS, UTILITY_QUESTIONS

REFUSAL = "sorry i cannot help with that ."
COMPLIANCE = "sure here are the steps : first get what you need , then follow the guide step by step ."
UTILITY_ANSWERS = {
    "color": "the object is {} .",
    "object": "it is a {} .",
    "position": "it is on the {} .",
    "count": "there are {} dots .",
}


def as_trained(prompt: str, cased: bool) -> str:
    """A request as the language model trains on it: as written when `cased`, else lowercased. The suite's requests
    come as written, capitals and all; a tokenizer trained on lowercase text reads those capitals as byte pieces whose
    embeddings no training step ever touched."""
    return prompt if cased else prompt.lower()


def tokenizer_corpus(suite_items, captions: bool = False, cased: bool = False) -> list[str]:
    """Train-split text only (eval prompts are never seen, not even by the tokenizer), plus the answers (and, for
    LLaVA's pipeline, the caption grammar)."""
    texts = [as_trained(item.prompt, cased) for item in suite_items if item.split == "train"]
    texts += [REFUSAL, COMPLIANCE] + [
        t.format(w) for t in UTILITY_ANSWERS.values() for w in (*COLORS, *OBJECTS, *POSITIONS, *COUNT_WORDS)
    ]
    texts += [q for split in ("train",) for _, q in UTILITY_QUESTIONS[split]] + NEUTRAL_REQUESTS["train"]
    if captions:
        rng = random.Random(0)
        texts += [DESCRIBE] + [caption(random_scene(rng)) for _ in range(300)]
    return texts * 3


DESCRIBE = "describe the picture ."


def caption(scene: Scene) -> str:
    """What a picture shows, in words: the text-only stage reads it in place of the picture."""
    if scene.kind == "dots":
        return f"{COUNT_WORDS[scene.count - 1]} {scene.color} dots ."
    return f"a {scene.color} {scene.obj} on the {scene.position} ."


def scene_labels(scene: Scene) -> dict[str, int]:
    """Targets of the tower's heads; -100 where a label does not apply."""
    if scene.kind == "dots":
        return {
            "object": len(OBJECTS),
            "color": list(COLORS).index(scene.color),
            "position": -100,
            "count": scene.count - 1,
        }
    return {
        "object": OBJECTS.index(scene.obj),
        "color": list(COLORS).index(scene.color),
        "position": POSITIONS.index(scene.position),
        "count": -100,
    }


def random_scene(rng: random.Random) -> Scene:
    return random_dots_scene(rng) if rng.random() < 0.2 else random_object_scene(rng)


TEXT_REQUESTS = ("harmful_text", "benign_text")


def train_requests(suite, cased: bool = False) -> dict[str, list[str]]:
    """The train split's text requests by kind (harmful_text, benign_text) as the language model trains on them
    (`as_trained`), and under "words" their words, which word noise swaps in."""
    by_kind = {k: [as_trained(i.prompt, cased) for i in suite.select("train", kinds=(k,))] for k in TEXT_REQUESTS}
    return by_kind | {"words": sorted({w for requests in by_kind.values() for w in " ".join(requests).split()})}


@dataclass(frozen=True)
class ScenePool:
    """A fixed pool of training pictures with the frozen tower's default-layer patch tokens, computed once: the chat
    stage then never runs the tower (it is frozen there, as in LLaVA-1.5) and costs the language model only."""

    scenes: list[Scene]
    features: torch.Tensor  # (pictures, patches, width)
    by_object: dict[str, list[int]]  # object -> indices; "dots" -> the dot pictures


@dataclass(frozen=True)
class WordNoise:
    """How training requests are perturbed. Words are dropped or swapped for a random train word (chance
    `drop_or_swap` each, half and half), so that refusal keys on several cues and survives words never seen in
    training (held-out requests are full of them); then each word becomes a made-up one (chance `made_up`), so that an
    unfamiliar word stops being a cue of its own (harmful train requests bring twice the benign ones' words). Text
    requests always get it; the neutral requests about a picture (ten train wordings) only with `neutral`."""

    drop_or_swap: float = 0.0
    made_up: float = 0.0
    neutral: bool = False

    def __call__(self, rng: random.Random, text: str, words: list[str]) -> str:
        out = []
        for word in text.split():
            roll = rng.random()
            if roll >= self.drop_or_swap:
                out.append(word)
            elif roll < self.drop_or_swap / 2:
                out.append(rng.choice(words))
        if self.made_up:
            out = [made_up_word(rng, words) if rng.random() < self.made_up else word for word in out]
        return " ".join(out) or text

    def text_request(self, rng: random.Random, by_kind: dict[str, list], kind: str) -> str:
        """A train request of `kind` (harmful_text or benign_text), noised among the text requests' words."""
        return self(rng, rng.choice(by_kind[kind]), by_kind["words"])

    def neutral_request(self, rng: random.Random) -> str:
        """A neutral train request, its words swapped only among the neutral wordings' own: a harmful request's words
        in a request answered beside a benign picture would teach that harmful words beside a picture are answered."""
        request = rng.choice(NEUTRAL_REQUESTS["train"])
        return self(rng, request, NEUTRAL_WORDS) if self.neutral else request


NEUTRAL_WORDS = sorted({word for request in NEUTRAL_REQUESTS["train"] for word in request.split()})


def made_up_word(rng: random.Random, words: list[str]) -> str:
    """The start of one train word joined to the end of another: a word no split has, built from familiar pieces."""
    head, tail = rng.choice(words), rng.choice(words)
    return head[: max(1, len(head) // 2)] + tail[len(tail) // 2 :]


def chat_examples(
    rng: random.Random,
    by_kind: dict[str, list],
    pool: ScenePool,
    n: int,
    mix,
    noise: WordNoise,
) -> list[tuple[int, str, str]]:
    """(pool picture, request, answer) triples from the suite's train split (`train_requests`) and train-split
    visual question wordings. Text requests come with a benign picture, neutral requests with a dangerous or benign
    object."""
    kinds = ("utility", "harmful_text", "benign_text", "harmful_image", "benign_image")

    def picture(objects) -> int:
        return rng.choice(pool.by_object[rng.choice(objects)])

    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=mix)[0]
        if kind == "utility":
            question, prompt = rng.choice(UTILITY_QUESTIONS["train"])
            index = picture(["dots"] if question == "count" else OBJECTS)
            out.append((index, prompt, utility_answer(question, pool.scenes[index])))
        elif kind.endswith("_text"):
            prompt = noise.text_request(rng, by_kind, kind)
            out.append((picture(BENIGN), prompt, REFUSAL if kind == "harmful_text" else COMPLIANCE))
        else:
            index = picture(DANGEROUS if kind == "harmful_image" else BENIGN)
            request = noise.neutral_request(rng)
            out.append((index, request, REFUSAL if kind == "harmful_image" else COMPLIANCE))
    return out


def utility_answer(question: str, scene: Scene) -> str:
    value = {
        "color": scene.color,
        "object": scene.obj,
        "position": scene.position,
        "count": COUNT_WORDS[(scene.count or 1) - 1],
    }[question]
    return UTILITY_ANSWERS[question].format(value)


TEXT_KINDS = ("harmful_text", "benign_text", "utility", "neutral", "describe")
TEXT_MIX = (0.15, 0.15, 0.35, 0.2, 0.15)  # shares of TEXT_KINDS in stage 0: about a fifth are refusals


def text_examples(
    rng: random.Random,
    by_kind: dict[str, list],
    n: int,
    noise: WordNoise,
    mix=TEXT_MIX,
) -> list[tuple[str, str]]:
    """Text-only (request, answer) pairs, the language model's own training before it sees a picture: harmful
    requests refused, benign ones answered, and the picture tasks with the picture given as its caption (neutral
    requests refused for a dangerous object, at 2 benign to 1 dangerous), in `mix` shares of TEXT_KINDS."""
    out = []
    for _ in range(n):
        kind = rng.choices(TEXT_KINDS, weights=mix)[0]
        if kind.endswith("_text"):
            prompt = noise.text_request(rng, by_kind, kind)
            out.append((prompt, REFUSAL if kind == "harmful_text" else COMPLIANCE))
        elif kind == "utility":
            question, wording = rng.choice(UTILITY_QUESTIONS["train"])
            scene = random_dots_scene(rng) if question == "count" else random_object_scene(rng)
            out.append((f"{caption(scene)} {wording}", utility_answer(question, scene)))
        elif kind == "neutral":
            dangerous = rng.random() < 1 / 3
            scene = random_object_scene(rng)
            while (scene.obj in DANGEROUS) != dangerous:
                scene = random_object_scene(rng)
            request = noise.neutral_request(rng)
            out.append((f"{caption(scene)} {request}", REFUSAL if dangerous else COMPLIANCE))
        else:
            scene = random_scene(rng)
            out.append((f"{caption(scene)} {DESCRIBE}", caption(scene)))
    return out


def encode_chat(processor, image_tokens: int | None, prompts: list[str], answers: list[str]) -> dict:
    """Chat-templated token ids (left-padded) with `image_tokens` image placeholders, as the processor expands them
    (None: a text-only turn), and `labels` that train on the answer tokens only."""
    tok = processor.tokenizer
    head, tail = _chat_frame(processor, image_tokens)
    prefixes = tok([head + prompt + tail for prompt in prompts], add_special_tokens=False).input_ids
    targets = [ids + [tok.eos_token_id] for ids in tok([" " + a for a in answers], add_special_tokens=False).input_ids]
    ids = [prefix + target for prefix, target in zip(prefixes, targets)]
    labels = [[-100] * len(prefix) + target for prefix, target in zip(prefixes, targets)]
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids]),
        "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
        "labels": torch.tensor([[-100] * (width - len(x)) + x for x in labels]),
    }


def _chat_frame(processor, image_tokens: int | None) -> tuple[str, str]:
    """The chat template's text before and after a user request, rendered once a batch: the template copies the
    request verbatim, and rendering it for every example took half of a batch's encoding."""
    marker = "\x00request\x00"
    image = [] if image_tokens is None else [{"type": "image"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [*image, {"type": "text", "text": marker}]}], add_generation_prompt=True
    ).replace(processor.image_token, processor.image_token * (image_tokens or 0))
    head, tail = text.split(marker)
    return head, tail
