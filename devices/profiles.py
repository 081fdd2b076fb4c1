"""Target profiles: what a device can hold and run, as TOML data (`devices/profiles/*.toml`) read with tomllib.

A profile names its kind (`jetson` or `phone`), the memory budget the artifacts a device loads must fit in, the ONNX
opset, the artifact formats it ships by default, the quantization of each format (names the exporters define, in
`edgekit.export.quantizations`; the ONNX schemes in order of preference: a model whose default set would be over the
budget gets the next that fits), and the safety gate's limits (`edgekit.safety.limits`). `load_profile` takes a
profile name, a kind (its default profile), or a path to a TOML file of the same shape.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import UserError
from edgekit.export.quantizations import GGUF_QUANTIZATIONS, MMPROJ_QUANTIZATIONS, ONNX_QUANTIZATIONS
from edgekit.safety.limits import FLOOR_KEY, Limits, profile_limits

PROFILES_DIR = Path(__file__).parent / "profiles"
KINDS = ("jetson", "phone")
# onnx: the three ONNX graphs (+ onnxruntime-genai's files); gguf: the language model for llama.cpp (the hybrid
# runtime pairs it with the ONNX vision graph); mmproj: llama.cpp's own vision GGUF for its mtmd pipeline, opt-in on
# every target that takes gguf, because that pipeline mis-orders LLaVA's CLS token upstream (README: Export).
FORMATS = ("onnx", "gguf", "mmproj")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    kind: str  # jetson | phone
    description: str
    memory_budget_bytes: int  # what the artifacts one runtime loads may take
    onnx_opset: int
    formats: tuple[str, ...]
    onnx_quantization: str  # default ONNX scheme
    onnx_options: tuple[str, ...]  # schemes it accepts, in order from the default: over budget, the next that fits
    gguf_quantization: str  # language model
    mmproj_quantization: str  # vision tower + projector for llama.cpp
    gates: Limits  # ASR versus the original at its default layer; over-refusal and utility versus the model at K
    utility_floor: float | None = None  # percent utility every artifact must reach, where the target sets one
    default: bool = False  # the default profile of its kind
    source: str = ""  # the TOML file it came from

    @property
    def accepted_formats(self) -> tuple[str, ...]:
        """What an export for this target may write: its formats, plus the opt-in mmproj where it takes gguf."""
        return (*self.formats, "mmproj") if "gguf" in self.formats else self.formats

    def __post_init__(self):
        def check(value, allowed, what):
            if value not in allowed:
                raise UserError(f"profile {self.name!r}: {what} {value!r} is not one of {', '.join(allowed)}")

        check(self.kind, KINDS, "kind")
        for fmt in self.formats:
            check(fmt, FORMATS, "format")
        for scheme in (self.onnx_quantization, *self.onnx_options):
            check(scheme, ONNX_QUANTIZATIONS, "ONNX quantization")
        if self.onnx_quantization not in self.onnx_options:
            raise UserError(
                f"profile {self.name!r}: default ONNX quantization {self.onnx_quantization!r} is not "
                f"among its onnx_options {list(self.onnx_options)}"
            )
        check(self.gguf_quantization, GGUF_QUANTIZATIONS, "GGUF quantization")
        check(self.mmproj_quantization, MMPROJ_QUANTIZATIONS, "mmproj quantization")
        if self.memory_budget_bytes <= 0 or self.onnx_opset < 13:
            raise UserError(
                f"profile {self.name!r}: memory_budget_bytes {self.memory_budget_bytes} must be positive "
                f"and onnx_opset {self.onnx_opset} at least 13"
            )


def _from_toml(path: Path) -> TargetProfile:
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"{path}: not a readable TOML profile ({err})") from None
    try:
        quant, gates = data["quantization"], data["gates"]
        return TargetProfile(
            name=data["name"],
            kind=data["kind"],
            description=data.get("description", ""),
            memory_budget_bytes=int(data["memory_budget_bytes"]),
            onnx_opset=int(data["onnx_opset"]),
            formats=tuple(data["formats"]),
            onnx_quantization=quant["onnx"],
            onnx_options=tuple(quant.get("onnx_options", [quant["onnx"]])),
            gguf_quantization=quant["gguf"],
            mmproj_quantization=quant["mmproj"],
            default=bool(data.get("default", False)),
            source=str(path),
            gates=profile_limits(gates),
            utility_floor=None if gates.get(FLOOR_KEY) is None else float(gates[FLOOR_KEY]),
        )
    except KeyError as err:
        raise UserError(f"{path}: profile lacks the key {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: malformed profile ({err})") from None


def list_profiles() -> tuple[TargetProfile, ...]:
    """The built-in profiles, jetson first, each kind's default first."""
    profiles = [_from_toml(p) for p in sorted(PROFILES_DIR.glob("*.toml"))]
    return tuple(sorted(profiles, key=lambda p: (KINDS.index(p.kind), not p.default, p.name)))


def load_profile(name_or_kind: str) -> TargetProfile:
    """A built-in profile by name, the default profile of a kind (`jetson`, `phone`), or a TOML file by path."""
    if str(name_or_kind).endswith(".toml"):
        path = Path(name_or_kind)
        if not path.is_file():
            raise UserError(f"{name_or_kind}: no such target profile file")
        return _from_toml(path)
    profiles = list_profiles()
    for profile in profiles:
        if profile.name == name_or_kind or (profile.kind == name_or_kind and profile.default):
            return profile
    targets = ", ".join([*KINDS, *(p.name for p in profiles)])
    raise UserError(f"unknown target {name_or_kind!r}; choose one of {targets} (or a profile .toml file)")
