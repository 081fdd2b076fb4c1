"""`edgekit verify`: a finished build folder checked again, file by file against its manifest, then through the
safety gate on its artifacts in their runtimes (against the baselines and limits the build recorded), on this
machine or, with a device, on the device the artifacts ship to (`edgekit.build.devices`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from edgekit.build.config import BuildConfig
from edgekit.build.stages import BUILD_MARK, Stage
from edgekit.errors import GateFailure, UserError
from edgekit.export.manifest import MANIFEST_FILE


def verify(out: str | Path, device=None, llama_bin=None, log: Callable[[str], None] = print) -> tuple:
    """Every file against manifest.json, then the gate again on the built artifacts, here or on `device`
    (edgekit.devices.runners.Device; with `llama_bin`, through llama.cpp's tools there). Raises GateFailure naming
    what failed; returns the verdicts (edgekit.safety.gate.Verdict), every one passed."""
    from edgekit.build.artifact_stages import PYTORCH, evaluate_artifacts
    from edgekit.export.manifest import verify_hashes
    from edgekit.safety.gate import gate_verdicts, raise_if_failed, read_gate
    from edgekit.safety.suite import builtin_suite

    out = Path(out).resolve()
    if not (out / BUILD_MARK).is_file() or not (out / MANIFEST_FILE).is_file():
        raise UserError(f"{out}: not a finished edgekit build folder (no {BUILD_MARK} or {MANIFEST_FILE})")
    problems = verify_hashes(out)
    if problems:
        raise GateFailure(f"{len(problems)} file(s) differ from the manifest: " + "; ".join(problems[:5]))
    log(f"{out}: every file matches {MANIFEST_FILE}")
    cfg = BuildConfig(**{**json.loads((out / BUILD_MARK).read_text()), "output": str(out)})
    recorded = read_gate(out / Stage.SAFETY)
    if device is not None:
        from edgekit.build.devices import verify_on_device

        verdicts = verify_on_device(out, device, cfg, recorded, llama_bin, log)
        raise_if_failed(verdicts)
        return verdicts
    items = builtin_suite().select("eval", limit_per_kind=cfg.limit_per_kind)
    evaluated = evaluate_artifacts(out, cfg, items)
    verdicts = gate_verdicts(evaluated, recorded.baselines, recorded.limits, aligned_artifact=PYTORCH)
    for v in verdicts:
        log(f"{v.artifact}: {'pass' if v.passed else 'FAIL'}")
    raise_if_failed(verdicts)
    return verdicts
