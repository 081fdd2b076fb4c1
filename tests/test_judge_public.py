"""benchmarks/judge_public.py on files written here in the published layouts: label mapping, the JailbreakBench
row cut and re-encoded copy, PyRIT's comment line and de-duplication, and the Wilson interval."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest

from edgekit.safety.judges import COMPLIANCE, REFUSAL

_spec = importlib.util.spec_from_file_location(
    "judge_public", Path(__file__).parents[1] / "benchmarks" / "judge_public.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

REFUSE = "I'm sorry, but I can't help with that."
COMPLY = "Sure. Step 1: mix the two. Step 2: heat it."


def _csv(path: Path, header: list[str], rows: list[list], encoding="utf-8", comment="") -> None:
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((comment + out.getvalue()).encode(encoding))


def test_sources_map_labels_and_keep_only_what_counts(tmp_path):
    head = ["Index", "goal", "prompt", "target_response", "human1", "human2", "human3", "human_majority",
            "harmbench_cf", "gpt4_cf", "llamaguard2_cf", "llama3_cf"]  # fmt: skip
    jbb = [[i, "g", f"prompt {i} caf\u00e9", COMPLY if i % 2 else REFUSE, 1, 1, 0, i % 2, i % 2, 1, 0, i % 2]
           for i in range(205)]  # fmt: skip
    _csv(tmp_path / "jbb" / "judge-comparison.csv", head, jbb, encoding="mac_roman")
    pyrit = tmp_path / "pyrit" / "scorer_evals"
    head = ["objective", "assistant_response", "human_score", "data_type"]
    _csv(pyrit / "refusal_scorer" / "refusal.csv", head, [["q", REFUSE, 1, "text"], ["q", REFUSE, 1, "text"]],
         comment="# dataset_version=1.2\n")  # fmt: skip
    _csv(pyrit / "refusal_scorer" / "refusal_extra.csv", head, [["r", COMPLY, 0, "text"]])
    _csv(pyrit / "objective" / "cyber.csv", head, [["r", COMPLY, 1, "text"], ["s", REFUSE, 0, "text"]])
    harmbench = tmp_path / "harmbench" / "data" / "classifier_val_sets" / "text_behaviors_val_set.json"
    harmbench.parent.mkdir(parents=True)
    record = {"test_case": "t", "experiment": "default", "cls": 1, "gpt-4-0613": 0, "llama_guard": 0}
    harmbench.write_text(json.dumps({"b1": [
        {**record, "generation": COMPLY, "model": "zephyr_7b.json", "human_0": 1, "human_1": 1, "human_2": 0},
        {**record, "generation": REFUSE, "model": "x.json", "experiment": "llama2_7b", "human_0": 1, "human_1": 0,
         "human_2": 0},
    ]}))  # fmt: skip

    sources = bench.load_sources(tmp_path)
    jbb_rows = sources["JailbreakBench judge comparison"]
    assert len(jbb_rows) == 200 and jbb_rows[0]["prompt"] == "prompt 0 caf\u00e9"  # XSTest rows cut, text decoded
    assert [r["label"] for r in jbb_rows[:2]] == [REFUSAL, COMPLIANCE]
    assert [(r["prompt"], r["label"]) for r in sources["PyRIT refusal"]] == [("q", REFUSAL), ("r", COMPLIANCE)]
    assert [(r["prompt"], r["label"]) for r in sources["PyRIT objective"]] == [("s", REFUSAL)]  # r: in the refusal set

    hb = sources["HarmBench classifier val"]
    assert [(r["label"], r["model"]) for r in hb] == [(COMPLIANCE, "zephyr_7b"), (REFUSAL, "llama2_7b")]  # 2 of 3

    calls = bench.judge_sources(sources, [bench.RefusalJudge()])
    results = bench.measure(sources, calls)
    assert results["HarmBench classifier val"]["HarmBench classifier (published)"]["agreement"] == 0.5
    assert set(results["HarmBench classifier val"]) == {"refusal-rules", "HarmBench classifier (published)",
                                                         "GPT-4 (published)", "Llama Guard (published)"}  # fmt: skip
    assert bench.per_model(sources, calls) == {
        "HarmBench classifier val": {
            "llama2_7b": {"n": 1, "refusal-rules": 1.0},
            "zephyr_7b": {"n": 1, "refusal-rules": 1.0},
        }
    }
    assert results["JailbreakBench judge comparison"]["refusal-rules"]["agreement"] == 1.0
    assert results["JailbreakBench judge comparison"]["GPT-4 (published)"]["agreement"] == 0.5  # says 1 throughout
    assert results["JailbreakBench judge comparison"]["HarmBench classifier (published)"]["agreement"] == 1.0


def test_wilson_interval():
    low, high = bench.wilson(81, 100)
    assert low == pytest.approx(0.7222, abs=1e-4) and high == pytest.approx(0.8749, abs=1e-4)
    assert bench.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
