"""Round 38's second object read: what each of layers 12 and 23 reads as over all thirteen pictured objects.

icet_diag.py's object read scores the suite's seven object words; on a model trained with `pictured_extra` (from
round38-pictured-objects.diff) the six extras may answer too. Same question, opening and scoring as the diagnostic's
(its own functions), over every word. Run from a tree with the diff applied:

    python docs/demo-attempts/round38-read-all-objects.py MODEL DIAGNOSTIC.json OUT.json
"""

import json
import sys
from dataclasses import replace

import torch

sys.path.insert(0, "benchmarks")
import icet_diag  # noqa: E402

from edgekit.model.loading import load  # noqa: E402
from edgekit.safety.images import DANGEROUS, OBJECTS, PICTURED_EXTRA  # noqa: E402
from edgekit.safety.scan import chat_inputs  # noqa: E402
from edgekit.safety.suite import UTILITY_QUESTIONS, builtin_suite  # noqa: E402

model_dir, diagnostic, out = sys.argv[1:4]
words = OBJECTS + PICTURED_EXTRA
loaded = load(model_dir)
opening = json.loads(open(diagnostic).read())["object_read"]["opening"]  # the model's own, at the default layer
question = next(prompt for kind, prompt in UTILITY_QUESTIONS["eval"] if kind == "object")
asked = [replace(i, prompt=question) for i in builtin_suite().select("eval") if i.scene is not None and i.scene.obj]
head, tails = icet_diag.object_word_tokens(loaded.processor.tokenizer, opening, words)
rows = {}
with torch.no_grad():
    for layer in (12, 23):
        probs = []
        for batch in icet_diag.batches(asked, 64):
            inputs = chat_inputs(loaded.processor, batch)
            features = loaded.family.features_per_layer(loaded.model, inputs, [layer])[layer]
            scores = icet_diag.word_log_probs(loaded.model, loaded.family, inputs, features, head, tails)
            probs.append(scores.softmax(-1))
        mean = dict(zip(words, torch.cat(probs).mean(0).tolist()))
        rows[layer] = {
            "read_as": mean,
            "dangerous_share": sum(mean[w] for w in DANGEROUS),
            "extra_share": sum(mean[w] for w in PICTURED_EXTRA),
        }
        print(layer, sorted(mean.items(), key=lambda kv: -kv[1])[:3])
open(out, "w").write(json.dumps({"opening": opening, "pictures": len(asked), "layers": rows}, indent=1))
