"""Round 40: refusal at given exit layers by item kind and pictured object, over the eval split's request items.

Run from a scratch tree with round13-equal-ink.diff applied (its pictures are the ones the models were trained on):
    PYTHONPATH=. python round40-refusal-by-object.py MODEL 23
Prints, per layer, refused / items for each (kind, pictured object) pair, judged by the refusal judge.
"""

import sys
from collections import defaultdict

from edgekit.model.loading import load
from edgekit.safety.judges import RefusalJudge
from edgekit.safety.scan import scan
from edgekit.safety.suite import builtin_suite

model, layers = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
items = builtin_suite().select("eval", kinds=("harmful_text", "benign_text", "harmful_image", "benign_image"))
result = scan(load(model, dtype="float32"), items, layers, RefusalJudge())
for layer in result.layers:
    counts = defaultdict(lambda: [0, 0])
    for answer in layer.answers:
        tally = counts[answer.item.kind, answer.item.scene.obj]
        tally[0] += answer.refused
        tally[1] += 1
    cells = " ".join(f"{kind}:{obj} {refused}/{n}" for (kind, obj), (refused, n) in sorted(counts.items()))
    print(model.rstrip("/").split("/")[-1], "layer", layer.layer, cells)
