"""What a build leaves for people: report.md and report.html (scan before and after alignment, the gate per artifact,
sizes, latency and memory against the target's budget), a model card (README.md with Hugging Face metadata, so the
folder uploads to the hub as it is), and manifest.json over every file, written last."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from edgekit.build.artifact_stages import ALIGNED_SCAN, BENCH_FILE
from edgekit.build.stages import STAGE_FILE, Stage
from edgekit.export.manifest import MANIFEST_FILE
from edgekit.safety.gate import BASELINE_NAMES, SAFETY_FILE, read_gate
from edgekit.safety.limits import ALIGNED, EARLY_EXIT, FLOOR, ORIGINAL
from edgekit.safety.report import LABELS, SCAN_FILE, pct
from edgekit.safety.scan import METRICS
from edgekit.units import human_bytes


def _read(*path: str | Path) -> dict:
    return json.loads(Path(*path).read_text())


def plot_before_after(before: list[dict], after: list[dict], exit_layer: int, default_layer: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, metric in enumerate(METRICS):
        color = f"C{i}"
        for rows, style, when in ((before, "--", "before"), (after, "-", "after")):
            points = [(r["layer"], 100 * r[metric]) for r in rows if r.get(metric) is not None]
            if points:
                ax.plot(*zip(*points), style, marker="o", color=color, label=f"{LABELS[metric]}, {when}")
    ax.axvline(default_layer, color="grey", linestyle=":", linewidth=1, label=f"default layer {default_layer}")
    ax.axvline(exit_layer, color="black", linestyle=":", linewidth=1, label=f"exit layer K={exit_layer}")
    ax.set(xlabel="vision exit layer", ylabel="%", ylim=(-2, 102), title="scan before and after alignment")
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SHORT_NAMES = {
    BASELINE_NAMES[ORIGINAL]: "default layer",
    BASELINE_NAMES[EARLY_EXIT]: "unaligned at K",
    BASELINE_NAMES[ALIGNED]: "aligned at K",
    BASELINE_NAMES[FLOOR]: "floor",
}


def gate_rows(verdicts) -> list[list[str]]:
    rows = []
    for v in verdicts:
        if v.error:
            rows.append([v.artifact, "FAIL", "-", "-", "-", v.error])
            continue
        failed = [f"{c.metric} vs {SHORT_NAMES.get(c.versus, c.versus)}" for c in v.checks if not c.passed]
        rows.append(
            [
                v.artifact,
                "pass" if v.passed else "FAIL",
                *(pct(v.metrics.get(m)) for m in METRICS),
                "; ".join(failed) or "all checks pass",
            ]
        )
    return rows


def bench_table(bench: dict) -> str:
    """Bench rows (one per runtime, from bench.json or a device's) as a Markdown table."""
    return _table(["artifact", "first token", "decode tok/s", "peak RSS"], _bench_rows(bench))


def _bench_rows(bench: dict) -> list[list[str]]:
    rows = []
    for name, b in bench.items():
        if "error" in b:
            rows.append([name, b["error"], "", ""])
        elif (
            b.get("tool") == "llama-bench"
        ):  # the language model alone, its memory sampled (edgekit.devices.llama_tools)
            first = (
                f"LM prefill {b['lm_prefill_ms']} ms for {b['prompt_tokens']} tokens (llama-bench; vision not timed)"
            )
            memory = f">= {b['peak_rss_mib']} MiB (sampled {b['rss_samples']} times)"
            rows.append([name, first, str(b["decode_tok_s"]), memory])
        else:
            memory = f"{b['peak_rss_mib']} MiB ({b['baseline_rss_mib']} MiB before weights)"
            rows.append([name, f"{b['first_token_ms']} ms" + _phases(b), str(b["decode_tok_s"]), memory])
    return rows


def _phases(row: dict) -> str:
    if not row.get("vision_ms"):  # an older bench.json, or a runtime that encodes the image inside its prefill
        return ""
    return f" (vision {row['vision_ms']} + prefill {row['lm_prefill_ms']})"


def describe_device(facts: dict) -> str:
    """One line: what the device is (`edgekit.devices.runners.parse_facts`)."""
    parts = [facts.get("model"), facts.get("cpu"), facts.get("arch")]
    if "cores" in facts:
        parts.append(f"{facts['cores']} cores")
    if "memory_mib" in facts:
        parts.append(f"{human_bytes(facts['memory_mib'] << 20)} memory")
    parts += [facts.get("os"), facts.get("jetson"), facts.get("power_mode")]
    if python := facts.get("python"):  # what ran the runtimes (an emulated arm64 Python on an x86 host, say)
        parts.append(f"Python {python['version']} on {python['machine']}")
    return ", ".join(str(p) for p in parts if p)


def device_sections(out: Path) -> list[str]:
    """A section per device that ran this build (`edgekit bench/verify --device`): what it is, its gate, its bench."""
    from edgekit.build.devices import DEVICE_FILE, DEVICES_DIR

    lines = []
    for folder in sorted((out / DEVICES_DIR).glob("*/")):
        lines += [f"## On device `{folder.name}`", "", describe_device(_read(folder, DEVICE_FILE)) + ".", ""]
        if (folder / SAFETY_FILE).is_file():
            gate = read_gate(folder)
            passed = all(v.passed for v in gate.verdicts)
            lines += [
                f"Gate on the device: **{'PASSED' if passed else 'FAILED'}** (answers from the device, judged here).",
                "",
                _table(
                    ["artifact", "gate", "ASR %", "over-refusal %", "utility %", "checks"], gate_rows(gate.verdicts)
                ),
                "",
            ]
        if (folder / BENCH_FILE).is_file():
            lines += [bench_table(_read(folder, BENCH_FILE)["rows"]), ""]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def report_markdown(out: Path, cfg, profile, source: str, default_layer: int, verdicts) -> str:
    k = cfg.exit_layer
    gate = read_gate(out / Stage.SAFETY)
    export = _read(out, Stage.EXPORT, MANIFEST_FILE)
    bench = _read(out, Stage.BENCH, BENCH_FILE)
    align = _read(out, Stage.ALIGN, "align.json") if (out / Stage.ALIGN / "align.json").is_file() else {}
    base, aligned = gate.baselines[ORIGINAL], gate.baselines[ALIGNED]
    before_k = next(r for r in _read(out, Stage.SCAN, SCAN_FILE)["layers"] if r["layer"] == k)
    passed = all(v.passed for v in verdicts)
    sets = export["memory"]["sets"]
    budget = export["memory"]["budget_bytes"]
    size_rows = [
        [name, human_bytes(s["bytes"], "decimal"), f"{100 * s['bytes'] / budget:.2f}%", ", ".join(s["paths"])]
        for name, s in sets.items()
    ]
    return "\n".join(
        [
            f"# edgekit build: {source} at exit layer {k} for {profile.name}",
            "",
            f"**Gate: {'PASSED' if passed else 'FAILED'}.** Exit layer {k} (1-based vision block; the model's default "
            f"is {default_layer}). Target {profile.name}: {profile.description}.",
            "",
            "## Safety before and after alignment",
            "",
            "![scan before and after alignment](report_scan.png)",
            "",
            _table(
                ["model", "exit layer", "ASR %", "over-refusal %", "utility %"],
                [
                    ["original", f"{default_layer} (default)", *(pct(base[m]) for m in METRICS)],
                    ["original", str(k), *(pct(before_k[m]) for m in METRICS)],
                    [_after_label(cfg, align), str(k), *(pct(aligned[m]) for m in METRICS)],
                ],
            ),
            "",
            f"Eval split of the built-in suite, at most {cfg.limit_per_kind} items per kind, judge `{cfg.judge}`.",
            "",
            "## The gate, per artifact",
            "",
            f"Limits: {limits_text(gate)}. It fails closed.",
            "",
            _table(["artifact", "gate", "ASR %", "over-refusal %", "utility %", "checks"], gate_rows(verdicts)),
            "",
            "## Sizes against the memory budget",
            "",
            f"Budget {human_bytes(budget, 'decimal')} (weights a runtime loads; not the KV cache or activations).",
            "",
            _table(["runtime set", "size", "of budget", "files"], size_rows),
            "",
            "## Latency and memory (the build machine, one process per runtime)",
            "",
            bench_table(bench),
            "",
            *device_sections(out),
            "## Stages",
            "",
            _table(
                ["stage", "seconds", "output sha256"],
                [
                    [name, str(s["seconds"]), s["output_sha256"][:16]]
                    for name in Stage
                    if (out / name / STAGE_FILE).is_file() and (s := _read(out, name, STAGE_FILE))
                ],
            ),
            "",
        ]
    )


def _after_label(cfg, align: dict) -> str:
    return "unaligned (--method none)" if cfg.method == "none" else f"aligned ({align.get('method', cfg.method)})"


def limits_text(gate) -> str:
    """The gate's limits in words: per baseline, the metrics it limits."""
    from edgekit.safety.limits import HIGHER_IS_WORSE

    parts = []
    for baseline, limits in gate.limits.items():
        if baseline == FLOOR:
            parts.append(f"utility at least {pct(gate.baselines[FLOOR]['utility'])}% (the target's floor)")
            continue
        limited = [
            f"{LABELS[m]} {'+' if HIGHER_IS_WORSE[m] else '-'}{getattr(limits, m):g}"
            for m in METRICS
            if getattr(limits, m) is not None
        ]
        parts.append(f"{', '.join(limited)} points versus the {BASELINE_NAMES[baseline]}")
    return "; ".join(parts)


def model_card(out: Path, cfg, profile, source: str, default_layer: int, verdicts) -> str:
    aligned = read_gate(out / Stage.SAFETY).baselines[ALIGNED]
    hub_base = [f"base_model: {source}"] if "/" in source and not Path(source).exists() else []
    front = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        *hub_base,
        "tags:",
        *(f"- {t}" for t in ("edgekit", "early-exit", "safety-alignment", "l-ppo", "onnx", "gguf", profile.kind)),
        "---",
        "",
    ]
    passed = all(v.passed for v in verdicts)
    return "\n".join(
        [
            *front,
            f"# {Path(source).name} with its vision tower cut at layer {cfg.exit_layer}, for {profile.name}",
            "",
            f"Built by `edgekit build --exit-layer {cfg.exit_layer} --target {cfg.target}` from `{source}`. The vision "
            f"tower keeps blocks 1-{cfg.exit_layer} (the default exit is {default_layer}); "
            + (
                "the language model was not re-aligned (`--method none`)."
                if cfg.method == "none"
                else f"the language model was re-aligned with {cfg.method.upper()} at exit layer {cfg.exit_layer} so "
                "that the shorter tower does not unlock harmful answers."
            ),
            "",
            f"Safety gate: **{'passed' if passed else 'FAILED'}**. Aligned model at layer {cfg.exit_layer}: ASR "
            f"{pct(aligned['asr'])}%, over-refusal {pct(aligned['over_refusal'])}%, utility {pct(aligned['utility'])}% "
            "on the built-in eval split (see report.md).",
            "",
            "| folder | what |",
            "|---|---|",
            f"| `{Stage.TRUNCATE}/` | the truncated PyTorch checkpoint (plain transformers) |",
            f"| `{Stage.EXPORT}/` | ONNX and GGUF artifacts with their manifest and the processor |",
            "| `report.md`, `report.html` | scans, the gate per artifact, sizes, latency and memory |",
            f"| `{MANIFEST_FILE}` | sha256 of every file; `edgekit verify` checks it and re-runs the gate |",
            "",
            "Limitations: the safety suite measures refusal of harmful requests and answers to benign ones on the "
            "built-in suite; it is a regression check, not a guarantee.",
            "",
            "\n".join(f"- {line}" for v in verdicts for line in v.failures()),
        ]
    )


def report_html(markdown: str, out: Path) -> str:
    """The Markdown report as one self-contained page: tables and headings rendered, the plot embedded."""
    body, table = [], []

    def flush_table():
        if table:
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in table if not set(row) <= set("|-")]
            head, *rest = cells
            body.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
                + "</table>"
            )
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            data = base64.b64encode((out / src).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(src)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line:
            text = html.escape(line).replace("**", "")
            body.append(f"<p>{text}</p>")
    flush_table()
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:.2em .5em}"
        "table{border-collapse:collapse}img{max-width:100%}"
    )
    return f"<!doctype html><meta charset=utf-8><title>edgekit build</title><style>{style}</style>\n" + "\n".join(body)


def write_report(out: Path, cfg, profile, source: str, default_layer: int, verdicts) -> None:
    from edgekit.export.manifest import file_entry, write_manifest

    before = _read(out, Stage.SCAN, SCAN_FILE)["layers"]
    after = _read(out, Stage.SAFETY, ALIGNED_SCAN, SCAN_FILE)["layers"]
    plot_before_after(before, after, cfg.exit_layer, default_layer, out / "report_scan.png")
    markdown = report_markdown(out, cfg, profile, source, default_layer, verdicts)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(report_html(markdown, out))
    (out / "README.md").write_text(model_card(out, cfg, profile, source, default_layer, verdicts))
    export = _read(out, Stage.EXPORT, MANIFEST_FILE)
    quantization = {f"{Stage.EXPORT}/{f['path']}": f["quantization"] for f in export["files"]}
    files = [
        file_entry(out, p, p.suffix.lstrip(".") or "file", quantization.get(p.relative_to(out).as_posix(), "none"))
        for p in sorted(out.rglob("*"))
        if p.is_file() and p != out / MANIFEST_FILE
    ]
    gate = {"passed": all(v.passed for v in verdicts), "artifacts": [v.as_json() for v in verdicts]}
    write_manifest(
        out,
        exit_layer=cfg.exit_layer,
        target=profile.name,
        source_model=source,
        revision=cfg.revision,
        files=files,
        extra={"gate": gate, "build": cfg.as_json()},
    )


def refresh_report(out: Path) -> None:
    """The report, model card and manifest of a finished build written again from its folder (after results were
    added to it, e.g. from a device)."""
    from edgekit.build.config import BuildConfig
    from edgekit.build.stages import BUILD_MARK
    from edgekit.devices.profiles import load_profile

    out = Path(out).resolve()
    cfg = BuildConfig(**{**_read(out, BUILD_MARK), "output": str(out)})
    scan = _read(out, Stage.SCAN, SCAN_FILE)
    source = _read(out, MANIFEST_FILE)["source_model"]
    verdicts = read_gate(out / Stage.SAFETY).verdicts
    write_report(out, cfg, load_profile(cfg.target), source, scan["default_layer"], verdicts)
