"""What the model stages write: 01_scan, 02_align, 03_truncate and 04_export. Each takes its stage folder and writes
it whole or not at all (`edgekit.outputs.atomic_dir`, or the writer's own `overwrite=True`)."""

from __future__ import annotations

import sys
from pathlib import Path

from edgekit.build.config import BuildConfig
from edgekit.outputs import atomic_dir


def load_model(source, cfg: BuildConfig, dtype: str | None = None, lazy: bool = False):
    """The base model (at the revision asked for) or a checkpoint a stage wrote, in `dtype` (default: the build's,
    for scans and alignment)."""
    from edgekit.model.loading import load

    revision = cfg.revision if source == cfg.model else None
    return load(source, dtype=dtype or cfg.dtype, device=cfg.device, revision=revision, lazy=lazy)


def scan_into(tmp: Path, loaded, cfg: BuildConfig, items, layers, default_layer: int, name: str):
    """Scan `loaded` at `layers` and write the scan report (scan.json, .md, .png) into `tmp`."""
    from tqdm import tqdm

    from edgekit.safety.judges import make_judge
    from edgekit.safety.report import write_scan_report
    from edgekit.safety.scan import scan

    with tqdm(total=len(items), desc=f"scan {name} ({len(layers)} layers)", unit="item", file=sys.stderr) as bar:
        result = scan(
            loaded, items, layers, make_judge(cfg.judge), max_new_tokens=cfg.max_new_tokens, progress=bar.update
        )
    write_scan_report(result, tmp, model=name, suite="builtin/eval", judge=cfg.judge, default_layer=default_layer)
    return result


def write_scan(folder: Path, source, cfg: BuildConfig, items, layers, default_layer: int) -> None:
    loaded = load_model(source, cfg)
    with atomic_dir(folder, overwrite=True) as tmp:
        scan_into(tmp, loaded, cfg, items, layers, default_layer, "original")


def write_align(folder: Path, source, cfg: BuildConfig) -> None:
    from edgekit.align.checkpoint import work_dir
    from edgekit.align.config import LPPOConfig
    from edgekit.align.rewards import make_reward
    from edgekit.align.trainer import align

    loaded = load_model(source, cfg)
    reward = make_reward(cfg.reward, device=cfg.device) if cfg.method == "lppo" else None
    config = LPPOConfig(exit_layer=cfg.exit_layer, **cfg.align)
    # a checkpoint left by a killed build with these same inputs: continue it (align checks it matches)
    align(loaded, folder, config, reward, method=cfg.method, resume=work_dir(folder).exists(), overwrite=True)


def write_truncate(folder: Path, aligned: Path, cfg: BuildConfig) -> None:
    from edgekit.model.surgery import truncate_checkpoint

    truncate_checkpoint(load_model(aligned, cfg, "auto"), cfg.exit_layer, folder, overwrite=True)  # as saved


def write_export(folder: Path, model: Path, cfg: BuildConfig, profile) -> None:
    import logging

    from edgekit.export.artifacts import export_artifacts

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger
    export_artifacts(
        load_model(model, cfg, "auto", lazy=True),  # as saved; the GGUF streams from the files
        cfg.exit_layer,
        profile,
        folder,
        cfg.formats or profile.formats,
        overwrite=True,
        onnx_quantization=cfg.onnx_quantization,
    )
