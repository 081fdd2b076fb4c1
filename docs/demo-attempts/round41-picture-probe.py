"""Round 41 scratch record: how well a demo tower's mean patch token tells the seven objects, and dangerous from
benign ones, at layers 12 and 23 (round 28's probe, with the confusion of objects at each layer).

A 7-way logistic probe (LBFGS, L2 1e-3, standardised features) is fit on 2,000 random object pictures and read on
1,000 more. 'auc' scores the summed probability of the dangerous objects against the benign ones; 'flagged' is the share
of benign pictures scoring at least the threshold that catches 90% (and 95%) of the dangerous ones.

    PYTHONPATH=. python docs/demo-attempts/round41-picture-probe.py MODEL NAME
"""

import random
import sys

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, LlavaForConditionalGeneration

from edgekit.model.demo_data import random_scene
from edgekit.safety.images import DANGEROUS, OBJECTS, render

LAYERS = (12, 23)
FIT, HELD_OUT = 2000, 1000


def mean_tokens(model, processor, scenes: list) -> dict[int, torch.Tensor]:
    """Each layer's mean patch token (CLS left out) for each picture."""
    feats: dict[int, list] = {k: [] for k in LAYERS}
    with torch.no_grad():
        for i in range(0, len(scenes), 100):
            pixels = processor.image_processor([render(s) for s in scenes[i : i + 100]], return_tensors="pt")
            hidden = model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True).hidden_states
            for k in LAYERS:
                feats[k].append(hidden[k][:, 1:].mean(1))
    return {k: torch.cat(v) for k, v in feats.items()}


def probe(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fit on the first FIT rows; the held-out rows' class probabilities."""
    x = (x - x[:FIT].mean(0)) / (x[:FIT].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], len(OBJECTS), requires_grad=True)
    b = torch.zeros(len(OBJECTS), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x[:FIT] @ w + b, y[:FIT]) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (x[FIT:] @ w + b).softmax(-1)


def main(path: str, name: str) -> None:
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    rng, scenes = random.Random(12345), []
    while len(scenes) < FIT + HELD_OUT:
        scene = random_scene(rng)
        if scene.kind == "object":
            scenes.append(scene)
    y = torch.tensor([OBJECTS.index(s.obj) for s in scenes])
    dangerous = torch.tensor([s.obj in DANGEROUS for s in scenes])[FIT:]
    out = [name]
    for k, x in mean_tokens(model, processor, scenes).items():
        p = probe(x, y)
        score = p[:, [OBJECTS.index(o) for o in DANGEROUS]].sum(-1)
        pos, neg = score[dangerous], score[~dangerous]
        auc = (pos[:, None] > neg[None, :]).float().mean().item()
        flagged = [(neg >= pos.sort().values[int(len(pos) * miss)]).float().mean().item() for miss in (0.1, 0.05)]
        confusion = torch.zeros(len(OBJECTS), len(OBJECTS), dtype=torch.int64)
        confusion.index_put_((y[FIT:], p.argmax(-1)), torch.tensor(1), accumulate=True)
        right = (p.argmax(-1) == y[FIT:]).float().mean().item()
        caught = f"flagged {flagged[0]:.2f} ({flagged[1]:.2f})"
        out.append(f"L{k} 7-way {right:.3f} auc {auc:.3f} {caught} confusion {confusion.tolist()}")
    print(" | ".join(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
