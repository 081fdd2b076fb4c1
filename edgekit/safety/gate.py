"""The safety regression gate: each exported artifact answers the eval split in its own runtime, and its ASR,
over-refusal and utility must stay within limits of the baselines `edgekit.safety.limits` explains: ASR against the
original model at its default exit layer, over-refusal and utility against the original model at K (what the early
exit costs by itself), utility against the target's floor where it sets one, and every metric against the aligned
PyTorch model at K (what export and quantization may cost). The verdicts, with the baselines and limits they were
judged by, are kept in `safety.json`.

It fails closed: a runtime or judge that errors, or a metric with no items, fails the artifact; nothing passes by
default."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from edgekit.devices.runtime import Prompt, Runtime
from edgekit.errors import GateFailure
from edgekit.safety.judges import Judge
from edgekit.safety.limits import (
    ALIGNED,
    EARLY_EXIT,
    FLOOR,
    HIGHER_IS_WORSE,
    ORIGINAL,
    Limits,
    limits_from_json,
    limits_json,
)
from edgekit.safety.scan import METRICS, Answer, LayerResult, score_layer
from edgekit.safety.suite import Item

SAFETY_FILE = "safety.json"
BASELINE_NAMES = {
    ORIGINAL: "original model at its default layer",
    EARLY_EXIT: "original model at K (unaligned)",
    ALIGNED: "aligned PyTorch model at K",
    FLOOR: "target's utility floor",
}


@dataclass(frozen=True)
class Check:
    artifact: str
    metric: str
    versus: str  # the baseline's name
    value: float | None
    baseline: float | None
    limit_points: float
    passed: bool

    def describe(self) -> str:
        sign = "+" if HIGHER_IS_WORSE[self.metric] else "-"
        value = "n/a" if self.value is None else f"{100 * self.value:.1f}%"
        base = "n/a" if self.baseline is None else f"{100 * self.baseline:.1f}%"
        return f"{self.artifact}: {self.metric} {value} against {base} for the {self.versus} " + (
            f"(limit {sign}{self.limit_points:g} points)" if self.limit_points else "(may not be below it)"
        )


@dataclass(frozen=True)
class Verdict:
    artifact: str
    metrics: dict[str, float | None]
    checks: tuple[Check, ...]
    error: str | None = None  # the runtime or judge failed: the artifact fails, whatever its checks

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{self.artifact}: {self.error}"] if self.error else [c.describe() for c in self.checks if not c.passed]

    def as_json(self) -> dict:
        return {
            "artifact": self.artifact,
            "passed": self.passed,
            "metrics": self.metrics,
            "error": self.error,
            "checks": [asdict(c) for c in self.checks],
        }

    @classmethod
    def from_json(cls, data: dict) -> Verdict:
        return cls(data["artifact"], data["metrics"], tuple(Check(**c) for c in data["checks"]), data["error"])


class Evaluated(NamedTuple):
    """One artifact's answers to the eval split: its metrics, or the error (a runtime or judge failure) that stopped
    it."""

    metrics: dict[str, float | None] | None
    answers: list[Answer]
    error: str | None


class GateRecord(NamedTuple):
    """What `safety.json` holds: the baselines' metrics, the limits versus each, and every artifact's verdict."""

    baselines: dict[str, dict[str, float | None]]
    limits: dict[str, Limits]
    verdicts: tuple[Verdict, ...]


def answer_items(
    runtime: Runtime,
    items: Sequence[Item],
    judge: Judge,
    layer: int,
    max_new_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> LayerResult:
    """Greedy answers of `runtime` to every item, judged and scored like one layer of a scan."""
    texts = []
    for item in items:
        texts.append(runtime.decode(runtime.generate(Prompt(item.image(), item.prompt), max_new_tokens)))
        if progress:
            progress(1)
    return judged(items, texts, judge, layer)


def judged(items: Sequence[Item], texts: Sequence[str], judge: Judge, layer: int) -> LayerResult:
    """Answers `texts` to `items`, judged and scored like one layer of a scan."""
    verdicts = judge.judge([item.prompt for item in items], list(texts))
    return score_layer(
        layer, [Answer(i, layer, t, v.label == "refusal", v.unsafe) for i, t, v in zip(items, texts, verdicts)]
    )


def write_answers(path: Path, answers: Sequence[Answer]) -> None:
    """One JSON line per answer: the item, the response and the judge's call."""
    with open(path, "w") as f:
        for a in answers:
            row = {"id": a.item.id, "kind": a.item.kind, "prompt": a.item.prompt, "response": a.response}
            f.write(json.dumps({**row, "refused": a.refused}) + "\n")


def metric_values(result: LayerResult) -> dict[str, float | None]:
    return {m: result.metrics[m].value for m in METRICS}


def check(artifact: str, metrics: dict[str, float | None], baselines: dict[str, tuple[dict, Limits]]) -> Verdict:
    """Every metric against every baseline that limits it; a missing value on either side fails."""
    checks = []
    for versus, (base, limits) in baselines.items():
        for metric in METRICS:
            value, ref, limit = metrics.get(metric), base.get(metric), getattr(limits, metric)
            if limit is None:
                continue
            ok = value is not None and ref is not None
            if ok:
                worse_by = (value - ref) if HIGHER_IS_WORSE[metric] else (ref - value)
                ok = 100 * worse_by <= limit + 1e-9
            checks.append(Check(artifact, metric, versus, value, ref, limit, ok))
    return Verdict(artifact, metrics, tuple(checks))


def gate_verdicts(
    evaluated: Mapping[str, Evaluated],
    baselines: Mapping[str, dict],
    limits: Mapping[str, Limits],
    aligned_artifact: str,
) -> tuple[Verdict, ...]:
    """Every artifact against every baseline in `limits`, but `aligned_artifact` not against the aligned model
    (which is that artifact)."""
    verdicts = []
    for name, (metrics, _, error) in evaluated.items():
        if error:
            verdicts.append(Verdict(name, {}, (), error))
            continue
        versus = [b for b in limits if not (b == ALIGNED and name == aligned_artifact)]
        verdicts.append(check(name, metrics, {BASELINE_NAMES[b]: (baselines[b], limits[b]) for b in versus}))
    return tuple(verdicts)


def write_gate(folder: Path, record: GateRecord) -> None:
    data = {
        "baselines": record.baselines,
        "limits": limits_json(record.limits),
        "verdicts": [v.as_json() for v in record.verdicts],
    }
    (folder / SAFETY_FILE).write_text(json.dumps(data, indent=2))


def read_gate(folder: Path) -> GateRecord:
    data = json.loads((folder / SAFETY_FILE).read_text())
    verdicts = tuple(Verdict.from_json(v) for v in data["verdicts"])
    return GateRecord(data["baselines"], limits_from_json(data["limits"]), verdicts)


def raise_if_failed(verdicts: Sequence[Verdict]) -> None:
    """GateFailure naming every failed check (artifact, metric, value, baseline and limit), if any failed."""
    failures = [line for v in verdicts for line in v.failures()]
    if failures:
        raise GateFailure(f"safety gate failed for {len(failures)} check(s): " + "; ".join(failures))
