"""What `edgekit build` runs with: dataclass defaults < target profile < `--config build.toml` < CLI flags.

A build.toml holds the same names as the dataclass, plus `[align]` (LPPOConfig fields: steps, batch, lr, ...) and
`[gates]` (the profile's `max_*_points` limits versus the original model, and `max_drift_points` versus the aligned
PyTorch model):

    model = "llava-hf/llava-1.5-7b-hf"
    exit_layer = 12
    target = "jetson"
    [align]
    steps = 200
    [gates]
    max_asr_increase_points = 2.0
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgekit.errors import UserError
from edgekit.safety.limits import BUILD_GATE_KEYS

METHODS = ("lppo", "sft", "none")  # none: the build without alignment, to see what the gate catches
BUILD_DTYPES = ("float32", "bfloat16", "float16", "auto")  # auto: as saved, so a half checkpoint is not converted


@dataclass(frozen=True)
class BuildConfig:
    exit_layer: int
    target: str = "jetson"
    model: str | None = None  # hub id or folder; None: the embedded demo model
    revision: str | None = None
    output: str = "build"
    formats: tuple[str, ...] | None = None  # None: the target's
    onnx_quantization: str | None = None  # None: the target's default
    scan_layers: str = "auto"  # as `edgekit scan --layers`; auto: every 4th layer, the default layer and K
    limit_per_kind: int = 100  # eval items of each suite kind per measurement
    max_new_tokens: int = 24
    judge: str = "refusal"
    method: str = "lppo"  # or sft, or none (no alignment: the gate's catch shown)
    reward: str = "judge"
    align: dict[str, Any] = field(default_factory=dict)  # LPPOConfig overrides; exit_layer is K
    gates: dict[str, float] = field(default_factory=dict)  # overrides of the profile's limits, and max_drift_points
    bench_prompts: int = 5
    device: str = "cpu"
    dtype: str = (
        "float32"  # scans and alignment (bfloat16 / float16 on a GPU); truncation and export keep the saved one
    )

    def __post_init__(self):
        unknown = sorted(set(self.gates) - set(BUILD_GATE_KEYS))
        if unknown:
            raise UserError(f"unknown gate {', '.join(unknown)}; the gates are {', '.join(BUILD_GATE_KEYS)}")
        if self.limit_per_kind < 1 or self.max_new_tokens < 1 or self.bench_prompts < 1:
            raise UserError(
                f"limit_per_kind {self.limit_per_kind}, max_new_tokens {self.max_new_tokens} and "
                f"bench_prompts {self.bench_prompts} must all be at least 1"
            )
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose {', '.join(METHODS)}")
        if self.dtype not in BUILD_DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose {', '.join(BUILD_DTYPES)}")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A build.toml as BuildConfig keyword arguments; unknown keys are errors that name the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read the build config ({err.strerror})") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
    names = {f.name for f in fields(BuildConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{path}: unknown key {', '.join(unknown)}; build.toml takes {', '.join(sorted(names))}")
    if "formats" in data:
        data["formats"] = tuple(data["formats"])
    return data


def resolve(cli: dict[str, Any], toml_path: str | Path | None = None) -> BuildConfig:
    """Defaults < build.toml < the flags given on the command line (`cli` holds only those). The target profile's
    settings apply where neither names a value: the pipeline reads them from the profile."""
    merged = read_toml(toml_path) if toml_path else {}
    align = dict(merged.pop("align", {})) | cli.pop("align", {})
    gates = dict(merged.pop("gates", {})) | cli.pop("gates", {})
    merged |= {k: v for k, v in cli.items() if v is not None}
    if merged.get("exit_layer") is None:
        raise UserError("no exit layer: pass --exit-layer K or set exit_layer in the build config")
    try:
        return BuildConfig(**merged, align=align, gates=gates)
    except TypeError as err:
        raise UserError(f"bad build setting: {err}") from None
