"""Shared fixtures: tiny checkpoints of each family, built once per test session in the real on-disk layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgekit.devices.profiles import TargetProfile, load_profile
from edgekit.model.tiny import TINY_FAMILIES, make_tiny_checkpoint

torch.set_num_threads(2)

FAST_BUILD = ["--limit-per-kind", "3", "--steps", "1", "--batch", "4", "--scan-layers", "12"]
GENEROUS_GATES = (
    "[gates]\nmax_asr_increase_points = 100\nmax_over_refusal_increase_points = 100\n"
    "max_utility_drop_points = 100\nmax_drift_points = 100\n"
)


def build_config(folder: Path, text: str) -> str:
    """A build.toml in `folder`: one bench prompt, then `text`."""
    path = folder / "build.toml"
    path.write_text("bench_prompts = 1\n" + text)
    return str(path)


def build_argv(model: str, out: Path, config: str) -> list[str]:
    """The fast build of the tiny LLaVA at exit 12 for the Jetson profile."""
    return [
        *("build", "--model", model, "--exit-layer", "12", "--target", "jetson"),
        *("-o", str(out), "--config", config, *FAST_BUILD),
    ]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: str(make_tiny_checkpoint(family, root / family)) for family in TINY_FAMILIES}


def full_precision_profile(onnx: str = "fp32", gguf: str = "f32") -> TargetProfile:
    """A Jetson profile whose artifacts are unquantized (or quantized as asked), for parity with PyTorch."""
    return dataclasses.replace(
        load_profile("jetson-agx-orin"),
        formats=("onnx", "gguf", "mmproj"),
        onnx_quantization=onnx,
        onnx_options=(onnx,),
        gguf_quantization=gguf,
        mmproj_quantization="f32",
    )


def sample_image(seed: int = 0, size: tuple[int, int] = (40, 60)) -> Image.Image:
    """A non-square RGB image, so resizing, cropping and anyres tiling are all exercised."""
    pixels = np.random.RandomState(seed).rand(*size, 3) * 255
    return Image.fromarray(pixels.astype("uint8"))


def processor_inputs(processor, text: str = "what colour is the shape in this picture", seed: int = 0) -> dict:
    """Processor-built inputs for one image and one chat-templated user turn, as a real caller would build them."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=sample_image(seed), text=prompt, return_tensors="pt"))
