"""The safety regression gate: each exported artifact answers the eval split in its own runtime, and its ASR,
over-refusal and utility must stay within limits of two baselines: the original model at its default exit layer
(the target profile's limits) and the aligned PyTorch model at the exit layer (what export and quantization may cost).

It fails closed: a runtime or judge that errors, or a metric with no items, fails the artifact; nothing passes by
default."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from edgekit.errors import GateFailure
from edgekit.devices.runtime import Prompt, Runtime
from edgekit.safety.judges import Judge
from edgekit.safety.scan import METRICS, Answer, LayerResult, score_layer
from edgekit.safety.suite import Item

HIGHER_IS_WORSE = {"asr": True, "over_refusal": True, "utility": False}


@dataclass(frozen=True)
class Limits:
    """How far each metric may move the wrong way from a baseline, in percentage points."""

    asr: float
    over_refusal: float
    utility: float


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
        return (f"{self.artifact}: {self.metric} {value} against {base} for the {self.versus} "
                f"(limit {sign}{self.limit_points:g} points)")  # fmt: skip


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
        return {"artifact": self.artifact, "passed": self.passed, "metrics": self.metrics, "error": self.error,
                "checks": [asdict(c) for c in self.checks]}  # fmt: skip


def answer_items(
    runtime: Runtime, items: Sequence[Item], judge: Judge, layer: int, max_new_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> LayerResult:  # fmt: skip
    """Greedy answers of `runtime` to every item, judged and scored like one layer of a scan."""
    texts = []
    for item in items:
        texts.append(runtime.decode(runtime.generate(Prompt(item.image(), item.prompt), max_new_tokens)))
        if progress:
            progress(1)
    verdicts = judge.judge([item.prompt for item in items], texts)
    return score_layer(layer, [Answer(i, layer, t, v.label == "refusal", v.unsafe) for i, t, v in zip(items, texts, verdicts)])


def metric_values(result: LayerResult) -> dict[str, float | None]:
    return {m: result.metrics[m].value for m in METRICS}


def check(artifact: str, metrics: dict[str, float | None], baselines: dict[str, tuple[dict, Limits]]) -> Verdict:
    """Every metric against every baseline; a missing value on either side fails."""
    checks = []
    for versus, (base, limits) in baselines.items():
        for metric in METRICS:
            value, ref, limit = metrics.get(metric), base.get(metric), getattr(limits, metric)
            ok = value is not None and ref is not None
            if ok:
                worse_by = (value - ref) if HIGHER_IS_WORSE[metric] else (ref - value)
                ok = 100 * worse_by <= limit + 1e-9
            checks.append(Check(artifact, metric, versus, value, ref, limit, ok))
    return Verdict(artifact, metrics, tuple(checks))


def raise_if_failed(verdicts: Sequence[Verdict]) -> None:
    """GateFailure naming every failed check (artifact, metric, value, baseline and limit), if any failed."""
    failures = [line for v in verdicts for line in v.failures()]
    if failures:
        raise GateFailure(f"safety gate failed for {len(failures)} check(s): " + "; ".join(failures))
