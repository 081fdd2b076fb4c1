"""Markdown tables of every demo-model attempt (JSON files written by benchmarks/demo_recipe.py).

python benchmarks/demo_attempts_table.py docs/demo-attempts/round?-v*.json > docs/demo-attempts.md.part

(Rounds 1-5 are demo_recipe.py runs; the later rounds keep scan and icet_diag reports, tabled by hand.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LAYERS = (1, 4, 8, 12, 16, 20, 23)


def main(paths: list[str]) -> None:
    for path in sorted(paths, key=lambda p: (Path(p).stem.split("-")[0], int(Path(p).stem.split("-v")[1]))):
        run = json.loads(Path(path).read_text())
        recipe = {k: v for k, v in run["recipe"].items() if k != "warmup"}
        print(f"### {Path(path).stem}\n\nrecipe: `{json.dumps(recipe)}`, trained in {run['train_seconds']:.0f} s\n")
        print("| layer | ASR | ASR text | ASR image | over-refusal | utility | probe object | probe dangerous |")
        print("|---|---|---|---|---|---|---|---|")
        for row in run["layers"]:
            if row["layer"] in LAYERS:
                cells = [
                    row[k]
                    for k in (
                        "asr",
                        "harmful_text",
                        "harmful_image",
                        "over_refusal",
                        "utility",
                        "probe_object",
                        "probe_dangerous",
                    )
                ]
                print(f"| {row['layer']} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
