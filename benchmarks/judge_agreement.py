"""Agreement of the offline refusal judges with hand-assigned labels (edgekit/safety/data/judge_labelled.jsonl).

    python benchmarks/judge_agreement.py [out.json]

Prints a Markdown table: agreement overall and per kind of response, for RefusalJudge and the KeywordJudge baseline,
on the dev split (where the rules were written) and the test split (held out). Writes the same numbers as JSON to
the path given, if any.
"""

import json
import sys
from collections import defaultdict

from edgekit.safety.judges import KeywordJudge, RefusalJudge, agreement, load_labelled

SPLITS = ("dev", "test")


def measure(judges, rows):
    """{judge name: {split: {"all": float, "n": int, "per_kind": {kind: {"agreement": float, "n": int}}}}}"""
    by_split = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_split[r["split"]][r["kind"]].append(r)
    out = {}
    for judge in judges:
        out[judge.name] = {}
        for split in SPLITS:
            kinds = by_split[split]
            split_rows = [r for rs in kinds.values() for r in rs]
            out[judge.name][split] = {
                "all": agreement(judge, split_rows),
                "n": len(split_rows),
                "per_kind": {k: {"agreement": agreement(judge, rs), "n": len(rs)} for k, rs in sorted(kinds.items())},
            }
    return out


def markdown(results):
    names = list(results)
    first = results[names[0]]
    head = "| kind | n dev | n test | " + " | ".join(f"{n} dev | {n} test" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]

    def row(label, pick):
        cells = [label, str(pick(first["dev"])["n"]), str(pick(first["test"])["n"])]
        for n in names:
            cells += [f"{pick(results[n][s])['value']:.3f}" for s in SPLITS]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("**all**", lambda d: {"n": d["n"], "value": d["all"]}))
    for kind in first["dev"]["per_kind"]:
        lines.append(row(kind, lambda d, k=kind: {"n": d["per_kind"][k]["n"], "value": d["per_kind"][k]["agreement"]}))
    return "\n".join(lines)


def main(argv):
    results = measure([RefusalJudge(), KeywordJudge()], load_labelled())
    print(markdown(results))
    if len(argv) > 1:
        with open(argv[1], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main(sys.argv)
