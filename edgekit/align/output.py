"""What a finished alignment run writes: the adapter, the merged checkpoint, the value head, the log, its curves, and
align.json with the run's identity and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from edgekit.align.policy import LORA_TARGETS, trainable
from edgekit.outputs import save_processor


def run_summary(log: list[dict], method: str) -> dict[str, Any]:
    """The steps run, the mean reward (L-PPO) or loss (SFT) over the first and last quarter of them, the exit layers
    used and the last step's row."""
    key = "reward_mean" if method == "lppo" else "loss"
    span = max(1, len(log) // 4)
    mean = lambda rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {
        "steps": len(log),
        f"{key}_first_quarter": mean(log[:span]),
        f"{key}_last_quarter": mean(log[-span:]),
        "exit_layers_used": sorted({r["exit_layer"] for r in log}),
        "last": log[-1],
    }


def write_output(tmp: Path, loaded, policy, value_head, log: list[dict], identity: dict, summary: dict) -> None:
    """adapter/, merged/ (a plain HF checkpoint), value_head.pt (L-PPO), train_log.jsonl, train_curves.png,
    align.json."""
    policy.save_pretrained(tmp / "adapter")
    if value_head is not None:
        torch.save(value_head.state_dict(), tmp / "value_head.pt")
    (tmp / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    plot_curves(log, tmp / "train_curves.png", title=f"{identity['method']} on {Path(identity['model']).name}")
    trainable_count = sum(p.numel() for p in trainable(policy, value_head))
    merged = policy.merge_and_unload()
    merged.save_pretrained(tmp / "merged", safe_serialization=True)
    save_processor(loaded.processor, loaded.source, tmp / "merged")
    settings = identity["config"]
    lora = {"r": settings["lora_r"], "alpha": settings["lora_alpha"], "target_modules": LORA_TARGETS}
    record = identity | {
        "revision": loaded.revision,
        "lora": lora,
        "trainable_parameters": trainable_count,
        "summary": summary,
    }
    (tmp / "align.json").write_text(json.dumps(record, indent=2))


def plot_curves(log: list[dict], path: Path, *, title: str) -> None:
    """Reward and KL against step (L-PPO), or the loss (SFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward_mean", "mean reward"), ("kl", "KL to reference")] if "kl" in log[0] else [("loss", "SFT loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    steps = [r["step"] for r in log]
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(steps, [r[key] for r in log], marker="o" if len(log) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
