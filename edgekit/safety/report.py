"""Reports: the scan as JSON (for machines), Markdown (for people) and a plot of each metric against exit layer."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.safety.scan import METRICS, ScanResult

LABELS = {"asr": "attack success rate", "over_refusal": "over-refusal", "utility": "utility"}
SCAN_FILE = "scan.json"


def scan_rows(result: ScanResult) -> list[dict]:
    rows = []
    for layer in result.layers:
        row: dict = {"layer": layer.layer}
        for name, est in layer.metrics.items():
            row[name] = est.value
            row[f"{name}_ci"] = [est.low, est.high]
            row[f"{name}_n"] = est.n
        rows.append(row)
    return rows


def write_scan_report(result: ScanResult, out: Path, *, model: str, suite: str, judge: str, default_layer: int) -> None:
    rows = scan_rows(result)
    summary = {
        "model": model,
        "suite": suite,
        "judge": judge,
        "default_layer": default_layer,
        "vision_forwards": result.vision_forwards,
        "images": result.images,
        "layers": rows,
    }
    (out / SCAN_FILE).write_text(json.dumps(summary, indent=2))
    (out / "scan.md").write_text(scan_markdown(rows, model=model, suite=suite, default_layer=default_layer))
    plot_scan(rows, out / "scan.png", title=f"{model} on {suite}", default_layer=default_layer)


def pct(value: float | None) -> str:
    """A rate as a percentage for a table; "-" where there is none (a metric with no items)."""
    return "-" if value is None else f"{100 * value:.1f}"


def scan_markdown(rows: list[dict], *, model: str, suite: str, default_layer: int) -> str:
    lines = [
        f"# ICET scan: {model}",
        "",
        f"Suite: {suite}. Percentages with 95% bootstrap intervals; layer {default_layer} is the model's default exit.",
        "",
        "| exit layer | ASR % | over-refusal % | utility % |",
        "|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"{pct(row.get(m))} [{pct(row.get(f'{m}_ci', [None])[0])}, {pct(row.get(f'{m}_ci', [None, None])[1])}]"
            for m in METRICS
        ]
        marker = " (default)" if row["layer"] == default_layer else ""
        lines.append(f"| {row['layer']}{marker} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scan(rows: list[dict], path: Path, *, title: str, default_layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = [r["layer"] for r in rows]
    for metric in METRICS:
        points = [(r["layer"], r[metric], *r[f"{metric}_ci"]) for r in rows if r.get(metric) is not None]
        if not points:
            continue
        x, y, low, high = zip(*points)
        ax.plot(x, [100 * v for v in y], marker="o", label=LABELS[metric])
        ax.fill_between(x, [100 * v for v in low], [100 * v for v in high], alpha=0.15)
    ax.axvline(default_layer, color="grey", linestyle="--", linewidth=1, label=f"default layer {default_layer}")
    ax.set(xlabel="vision exit layer k", ylabel="%", ylim=(-2, 102), title=title)
    ax.set_xticks(layers if len(layers) <= 24 else layers[::2])
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
