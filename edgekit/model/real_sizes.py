"""Random checkpoints with the dimensions of the models users bring, in the hub's on-disk layout, for the real-size
tests and benchmarks: config.json, sharded `model-0000N-of-0000M.safetensors` with their index, and the processor.

    python -m edgekit.model.real_sizes llava-1.5-7b OUT [--lm-layers 4]

| name                   | dimensions of                               | family     | dtype    |
|------------------------|---------------------------------------------|------------|----------|
| `llava-1.5-7b`         | llava-hf/llava-1.5-7b-hf                    | llava      | float16  |
| `llava-v1.6-mistral-7b`| llava-hf/llava-v1.6-mistral-7b-hf           | llava_next | float16  |
| `llama-3.2-11b-vision` | meta-llama/Llama-3.2-11B-Vision-Instruct    | mllama     | bfloat16 |

Widths, depths, heads, vocabulary sizes, image and patch sizes are the published ones (`--lm-layers` keeps fewer
language-model layers, for quicker runs). The tokenizer is a small trained one from `edgekit.model.tiny` (the
embedding keeps the real vocabulary size), so the image token's id is that tokenizer's, not 32000 or 128256.

Weights are written tensor by tensor, never the whole model and never a whole shard in memory: the model is built on
the meta device for its tensor names (as `save_pretrained` writes them) and shapes, and each shard's safetensors
header is computed first, then each tensor is drawn and appended. The safetensors library has no incremental writer
(its `save_file` takes every tensor of a file at once), hence the few lines of format writing here. Values: N(0,
0.02), norm weights 1, biases 0, Mllama's tanh gates open (as in `edgekit.model.tiny`).
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekit.model.loading import SAFETENSORS_INDEX

SHARD_BYTES = 5_000_000_000  # the hub's usual shard size for these repos
_CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
_LLAMA_2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
)
_MISTRAL_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32064,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
)


@dataclass(frozen=True)
class RealModel:
    family: str
    vision: dict
    text: dict
    dtype: torch.dtype
    text_type: str | None = None  # the language model's model_type where it is not the family's default


REAL_MODELS = {
    "llava-1.5-7b": RealModel("llava", _CLIP_L_336, _LLAMA_2_7B, torch.float16),
    "llava-v1.6-mistral-7b": RealModel("llava_next", _CLIP_L_336, _MISTRAL_7B, torch.float16, "mistral"),
    "llama-3.2-11b-vision": RealModel(
        "mllama",
        dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_global_layers=8,
            attention_heads=16,
            image_size=560,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[3, 7, 15, 23, 30],
            vision_output_dim=7680,
            supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        ),
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
            rope_theta=500_000.0,
            max_position_embeddings=131072,
        ),
        torch.bfloat16,
    ),
}
_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def real_config(name: str, lm_layers: int | None = None):
    """(config, processor) of REAL_MODELS[name], the processor from a small trained tokenizer."""
    from edgekit.model.tiny import TinySizes, build_tiny

    real = REAL_MODELS[name]
    vision, text = dict(real.vision), dict(real.text)
    sizes = TinySizes(image_size=vision["image_size"], patch_size=vision["patch_size"], vision_layers=2, text_layers=1)
    tiny, processor = build_tiny(real.family, sizes)
    if real.family == "mllama":  # four tiles of 560, as the real processor cuts them
        processor.image_processor.max_image_tiles = vision["max_num_tiles"]
    if lm_layers is not None:
        if real.family == "mllama":
            crossing = [i for i in text["cross_attention_layers"] if i < lm_layers]
            text["cross_attention_layers"] = crossing or [lm_layers - 1]
        text["num_hidden_layers"] = lm_layers
    # Rebuilt from dicts, not edited in place: configs derive fields (head_dim) from the widths when constructed.
    data = tiny.config.to_dict()
    data["vision_config"] |= vision
    data["text_config"] = {k: v for k, v in data["text_config"].items() if k != "head_dim"} | text
    if real.text_type:
        data["text_config"]["model_type"] = real.text_type
    if real.family != "mllama":
        data["image_seq_length"] = (vision["image_size"] // vision["patch_size"]) ** 2
    config = type(tiny.config).from_dict(data)
    config.dtype = real.dtype
    return config, processor


def tensor_layout(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor as `save_pretrained` names them on disk, from a model on the meta device."""
    from transformers import AutoModelForImageTextToText
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    state = revert_weight_conversion(model, model.state_dict())
    return [(name, tuple(tensor.shape)) for name, tensor in sorted(state.items())]


def _init(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(("gate", "_gate")):
        return (0.5 + 0.5 * torch.rand(shape, generator=generator)).to(dtype)
    return (0.02 * torch.randn(shape, generator=generator)).to(dtype)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * int(torch.Size(shape).numel())


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype, generator) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            f.write(_init(name, shape, dtype, generator).view(torch.uint8).numpy().tobytes())


def write_real_checkpoint(
    name: str,
    out: str | Path,
    lm_layers: int | None = None,
    shard_bytes: int = SHARD_BYTES,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """A random checkpoint of REAL_MODELS[name] in `out`, shard by shard, tensor by tensor."""
    from edgekit.units import human_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config, processor = real_config(name, lm_layers)
    dtype = REAL_MODELS[name].dtype
    layout = tensor_layout(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for entry in layout:
        size = _nbytes(entry[1], dtype)
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += size
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(_nbytes(shape, dtype) for _, shape in layout)
    log(f"{name}: {sum(int(torch.Size(s).numel()) for _, s in layout):,} parameters, {human_bytes(total)} in {out}")
    generator = torch.Generator().manual_seed(seed)
    for file, tensors in zip(files, shards):
        _write_shard(out / file, tensors, dtype, generator)
        log(f"  wrote {file}")
    weight_map = {tensor: file for file, tensors in zip(files, shards) for tensor, _ in tensors}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    processor.save_pretrained(out)
    sp_model = getattr(processor.tokenizer, "sentencepiece_model", None)
    if sp_model:
        (out / "tokenizer.model").write_bytes(sp_model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=REAL_MODELS)
    ap.add_argument("out")
    ap.add_argument("--lm-layers", type=int, help="keep this many language-model layers (default: all)")
    ap.add_argument("--shard-bytes", type=int, default=SHARD_BYTES)
    args = ap.parse_args()
    write_real_checkpoint(args.name, args.out, args.lm_layers, args.shard_bytes)


if __name__ == "__main__":
    main()
