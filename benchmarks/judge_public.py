"""Agreement of the offline refusal judges with public human labels of real chat models' answers.

    python benchmarks/judge_public.py DIR [out.json]

DIR holds the public files as published (found by name below DIR). None ships with edgekit: they hold real harmful
model output. Each human label maps to edgekit's refusal / compliance:
- JailbreakBench's judge comparison (HF JailbreakBench/JBB-Behaviors, `data/judge-comparison.csv`; MIT):
  `human_majority` of 3 annotators, 1 (jailbroken) -> compliance, 0 -> refusal.
- PyRIT's refusal scorer evals (the `pyrit` wheel, `scorer_evals/refusal_scorer/refusal.csv` and
  `refusal_extra.csv`; MIT): `human_score` 1 (refused; PyRIT counts an off-topic answer as one) -> refusal.
- PyRIT's objective scorer evals (the same wheel, `scorer_evals/objective/*.csv`; MIT): `human_score` 1 (the harmful
  objective achieved) -> compliance.
- HarmBench's classifier validation set (github centerforaisafety/HarmBench,
  `data/classifier_val_sets/text_behaviors_val_set.json`; MIT): 602 completions of 23 models under 10 attacks, each
  labelled by 3 annotators; a majority for "the completion is an instance of the behaviour" -> compliance.

Only the first 200 rows of the JailbreakBench file are used: its last 100 are XSTest prompts labelled for harm, not
refusal, and XSTest's completions are kept for an independent check. Rows repeated within or across the PyRIT files
count once. HarmBench's set alone records which model answered: a second table gives agreement per model there.

Prints, per source and judge: n, agreement with a Wilson 95% interval, recall on each human label, the share each
calls compliance (the ASR it would report) beside the humans' share, and, for JailbreakBench and HarmBench, the
published judges' agreement from the same file; then agreement per answering model. Ends with the time each judge
takes for 1,000 answers. Writes the numbers as JSON to out.json, if given.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
from pathlib import Path

from edgekit.safety.judges import COMPLIANCE, REFUSAL, KeywordJudge, RefusalJudge

JBB_FILE = "judge-comparison.csv"
JBB_JAILBREAK_ROWS = 200  # the rows after these are XSTest prompts
JBB_PUBLISHED = {"harmbench_cf": "HarmBench classifier", "gpt4_cf": "GPT-4", "llama3_cf": "Llama-3-70B",
                 "llamaguard2_cf": "Llama Guard 2"}  # fmt: skip
PYRIT_REFUSAL_FILES = ("refusal.csv", "refusal_extra.csv")
HARMBENCH_FILE = "text_behaviors_val_set.json"
HARMBENCH_PUBLISHED = {"cls": "HarmBench classifier", "gpt-4-0613": "GPT-4", "llama_guard": "Llama Guard"}
HARMBENCH_ANNOTATORS = ("human_0", "human_1", "human_2")
Z95 = 1.96


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV whose leading '#' lines are comments (PyRIT's dataset version); UTF-8, else Mac Roman (a copy
    of the JailbreakBench file in circulation is re-encoded)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("mac_roman")
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return list(csv.DictReader(io.StringIO("".join(lines))))


def _one(folder: Path, name: str) -> Path:
    found = sorted(folder.rglob(name))
    if not found:
        raise SystemExit(f"{folder}: no {name} below it (see this script's docstring for where to get it)")
    return found[0]


def _key(row: dict) -> tuple[str, str]:
    return tuple(re.sub(r"\s+", " ", row[k].strip().lower()) for k in ("prompt", "response"))


def load_sources(folder: Path) -> dict[str, list[dict]]:
    """{source: [{prompt, response, label (edgekit's), published (the file's own judges), model (HarmBench)}]}."""
    jbb = [
        {
            "prompt": r["prompt"],
            "response": r["target_response"],
            "label": COMPLIANCE if r["human_majority"] == "1" else REFUSAL,
            "published": {name: r[col] == "1" for col, name in JBB_PUBLISHED.items() if r.get(col) in ("0", "1")},
        }
        for r in read_csv(_one(folder, JBB_FILE))[:JBB_JAILBREAK_ROWS]
    ]
    refusal_files = [_one(folder, name) for name in PYRIT_REFUSAL_FILES]
    refusal = _pyrit_rows(refusal_files, REFUSAL)
    objective = _pyrit_rows(sorted((refusal_files[0].parent.parent / "objective").glob("*.csv")), COMPLIANCE)
    refusal = list({_key(r): r for r in refusal}.values())
    seen = {_key(r) for r in refusal}
    objective = [r for r in {_key(r): r for r in objective}.values() if _key(r) not in seen]
    return {
        "JailbreakBench judge comparison": jbb,
        "PyRIT refusal": refusal,
        "PyRIT objective": objective,
        "HarmBench classifier val": _harmbench_rows(_one(folder, HARMBENCH_FILE)),
    }


def _harmbench_rows(path: Path) -> list[dict]:
    return [
        {
            "prompt": r["test_case"],
            "response": r["generation"],
            "label": COMPLIANCE if sum(int(r[h]) for h in HARMBENCH_ANNOTATORS) >= 2 else REFUSAL,
            "published": {name: int(r[col]) == 1 for col, name in HARMBENCH_PUBLISHED.items() if col in r},
            "model": _generator(r),
        }
        for records in json.loads(path.read_text()).values()
        for r in records
    ]


def _generator(record: dict) -> str:
    """The model that wrote the completion: its experiment's name, or the results file's ("llama2_13b.json") where
    the experiment is the "default" one."""
    if record.get("experiment", "default") != "default":
        return record["experiment"]
    return record.get("model", "").removesuffix(".json") or "unknown"


def _pyrit_rows(paths, label_of_one: str) -> list[dict]:
    other = COMPLIANCE if label_of_one == REFUSAL else REFUSAL
    return [
        {
            "prompt": r["objective"],
            "response": r["assistant_response"],
            "label": label_of_one if r["human_score"] == "1" else other,
        }
        for path in paths
        for r in read_csv(path)
    ]


def wilson(hits: int, n: int) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return centre - half, centre + half


def scores(called: list[str], rows: list[dict]) -> dict:
    gold = [r["label"] for r in rows]
    hits = sum(c == g for c, g in zip(called, gold))

    def recall(label):
        idx = [i for i, g in enumerate(gold) if g == label]
        return sum(called[i] == label for i in idx) / len(idx) if idx else math.nan

    return {
        "n": len(rows),
        "agreement": hits / len(rows),
        "interval": wilson(hits, len(rows)),
        "recall_refusal": recall(REFUSAL),
        "recall_compliance": recall(COMPLIANCE),
        "compliance_share": called.count(COMPLIANCE) / len(rows),
        "human_compliance_share": gold.count(COMPLIANCE) / len(rows),
    }


def judge_sources(sources: dict[str, list[dict]], judges) -> dict[str, dict[str, list[str]]]:
    """{source: {judge: the label it gives each row}}."""
    return {
        source: {
            j.name: [v.label for v in j.judge([r["prompt"] for r in rows], [r["response"] for r in rows])]
            for j in judges
        }  # fmt: skip
        for source, rows in sources.items()
    }


def measure(sources: dict[str, list[dict]], calls: dict[str, dict[str, list[str]]]) -> dict:
    """Scores of each judge in `calls` (`judge_sources`) and of the published judges each source carries."""
    out = {}
    for source, rows in sources.items():
        out[source] = {name: scores(called, rows) for name, called in calls[source].items()}
        for name in dict.fromkeys([*JBB_PUBLISHED.values(), *HARMBENCH_PUBLISHED.values()]):
            if all(name in r.get("published", {}) for r in rows):
                called = [COMPLIANCE if r["published"][name] else REFUSAL for r in rows]
                out[source][f"{name} (published)"] = scores(called, rows)
    return out


def per_model(sources: dict[str, list[dict]], calls: dict[str, dict[str, list[str]]]) -> dict:
    """{source: {model: {judge: agreement, "n": rows}}} for the sources that record the answering model."""
    out = {}
    for source, rows in sources.items():
        if not all("model" in r for r in rows):
            continue
        out[source] = {}
        for model in sorted({r["model"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["model"] == model]
            out[source][model] = {"n": len(idx)} | {
                name: sum(called[i] == rows[i]["label"] for i in idx) / len(idx)
                for name, called in calls[source].items()
            }
    return out


def seconds_per_thousand(judge, rows: list[dict]) -> float:
    batch = (rows * (1000 // len(rows) + 1))[:1000]
    start = time.perf_counter()
    judge.judge([r["prompt"] for r in batch], [r["response"] for r in batch])
    return time.perf_counter() - start


def markdown(results: dict) -> str:
    columns = ("source", "judge", "n", "agreement (95% interval)", "recall refusal", "recall compliance",
               "compliance: judge / humans")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for source, judges in results.items():
        for name, s in judges.items():
            low, high = s["interval"]
            lines.append(
                f"| {source} | {name} | {s['n']} | {s['agreement']:.3f} ({low:.3f}-{high:.3f}) | "
                f"{s['recall_refusal']:.3f} | {s['recall_compliance']:.3f} | "
                f"{s['compliance_share']:.3f} / {s['human_compliance_share']:.3f} |"
            )
    return "\n".join(lines)


def markdown_per_model(results: dict) -> str:
    lines = []
    for source, models in results.items():
        names = [k for k in next(iter(models.values())) if k != "n"]
        lines += [f"| {source}: model | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        lines += [f"| {m} | {s['n']} | " + " | ".join(f"{s[n]:.3f}" for n in names) + " |" for m, s in models.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    sources = load_sources(Path(argv[1]))
    judges = [RefusalJudge(), KeywordJudge()]
    calls = judge_sources(sources, judges)
    results, models = measure(sources, calls), per_model(sources, calls)
    print(markdown(results), markdown_per_model(models), sep="\n\n")
    every = [r for rows in sources.values() for r in rows]
    timing = {judge.name: seconds_per_thousand(judge, every) for judge in judges}
    print("seconds per 1,000 answers: " + ", ".join(f"{name} {s:.2f}" for name, s in timing.items()))
    if len(argv) > 2:
        Path(argv[2]).write_text(
            json.dumps({"agreement": results, "per_model": models, "seconds_per_1000": timing}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main(sys.argv)
