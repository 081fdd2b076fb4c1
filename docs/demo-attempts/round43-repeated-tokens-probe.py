"""Round 43 scratch record: does a picture's token count amplify how far an early exit moves the words? Each eval
picture's projected tokens at layers 23 and 12 are fed k times over (each token repeated in place, k = 1, 2, 4), and the
first-token refusal margin (`benchmarks/icet_diag.py`'s decision tokens, from the model's own greedy answers) is
averaged per item kind, with the share of items whose margin leans to refusal.

    PYTHONPATH=.:benchmarks python docs/demo-attempts/round43-repeated-tokens-probe.py MODEL OUT.json
"""

import json
import sys

import icet_diag as diag
import torch

from edgekit.model.loading import load
from edgekit.safety.scan import chat_inputs
from edgekit.safety.suite import builtin_suite

KINDS = ("harmful_text", "benign_text", "harmful_image", "benign_image")


def repeated(inputs: dict, image_id: int, pad_id: int, k: int) -> dict:
    """The prompts with each image placeholder repeated k times, left-padded again."""
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        rows.append(torch.cat([t.repeat(k) if t == image_id else t.view(1) for t in ids[mask.bool()]]))
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def main(path: str, out: str) -> None:
    torch.set_num_threads(1)
    loaded = load(path, dtype="float32")
    model, family, tokenizer = loaded.model, loaded.family, loaded.processor.tokenizer
    items = [i for i in builtin_suite().select("eval") if i.kind in KINDS]
    decision = diag.decision_tokens(*diag.own_answers(loaded, items, 64))
    image_id = family.image_token_id(model.config)
    layers, copies = (23, 12), (1, 2, 4)
    margins = {(k, layer): [] for k in copies for layer in layers}
    for batch in diag.batches(items, 64):
        inputs = chat_inputs(loaded.processor, batch)
        features = family.features_per_layer(model, inputs, list(layers))  # one tower pass for both layers
        for k in copies:
            prompts = repeated(inputs, image_id, tokenizer.pad_token_id, k)
            for layer in layers:
                tokens = features[layer].repeat_interleave(k, dim=1).reshape(-1, features[layer].shape[-1])
                lm = family.lm_inputs(model, prompts, tokens)
                logits = diag.embeds_tail_logits(model, lm["inputs_embeds"], lm["attention_mask"], decision.prefix, 1)
                margins[k, layer].append(diag.refusal_margin(logits[:, -1], decision))
    report, kinds = {}, [item.kind for item in items]
    for (k, layer), parts in margins.items():
        split = diag.by_kind(torch.cat(parts), kinds)
        report[f"k{k} L{layer}"] = {
            kind: {"margin": round(v.mean().item(), 2), "refuse_share": round((v > 0).float().mean().item(), 3)}
            for kind in KINDS
            for v in [split[kind]]
        }
        print(f"k={k} L{layer}", report[f"k{k} L{layer}"], flush=True)
    json.dump(report, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
