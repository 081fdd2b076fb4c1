"""ONNX export in the three-file layout of transformers.js / onnx-community, for a vision tower exiting at block k.

    vision_encoder.onnx         image inputs -> `image_features` (what the language model consumes)
    embed_tokens.onnx           input_ids -> inputs_embeds
    decoder_model_merged.onnx   inputs_embeds, attention_mask, position_ids, past_key_values.N.{key,value}
                                -> logits, present.N.{key,value}  (prefill: past length 0; decode: one token)
    edgekit_onnx.json           every input/output with shape and dtype, the exit layer, image preprocessing,
                                chat template, special token ids, and what the host must do between the graphs

Per family (every difference comes from the family table, `edgekit.model.families`):
- LLaVA-1.5: the vision graph is the k-block CLIP tower, CLS dropped, projector applied: [images, tokens, d_text].
  The host scatters the features into the embeddings at the image-token positions.
- LLaVA-NeXT: the vision graph takes the stacked anyres tiles of all images [tiles, 3, H, W] and returns per-tile
  features [tiles, tokens, d_text]. Unpadding and packing with `image_newline` depend on each image's size (data-
  dependent shapes), so they stay on the host (`edgekit.devices.onnx_runtime`, numpy); `image_newline.npy` ships
  beside the graphs.
- Llama 3.2 Vision: the vision graph returns the cross-attention states [images*tiles, patches, d_text]. The decoder
  takes `cross_attention_states` and the processor's `cross_attention_mask` rows for the tokens being processed at
  EVERY step and recomputes the cross-attention K/V from them (no cross-attention cache): one merged graph with no
  control flow, at the cost of k/v projections of the vision tokens per decoded token. `past_key_values.N` exist
  only for the self-attention layers N (their list is in the JSON).

Exporter: the TorchScript exporter (`dynamo=False`). With flat tensors in and out of small wrapper modules it traces
transformers' code as is and keeps batch / sequence / past length dynamic through `dynamic_axes` (the decoder is
traced with a past of 2 and runs the prefill with a past of 0). Measured on the tiny LLaVA: vision graph 1.3 s against
12.5 s with the dynamo exporter, whose decoder export also needs `dynamic_shapes` for every flat past tensor and the
past + sequence = total relation spelled out. The 4-D additive attention mask is built in the wrapper from
`attention_mask`, so no mask-building branch of transformers is frozen into the trace.

Weights: traced without them (`export_params=False`), then written a tensor at a time by `onnx_data.attach_weights`
(past 256 MiB into `<graph>_data`; the embedding table always, shared with onnxruntime-genai's embedding graph). A
float16 model is traced in float16 behind float32 inputs and outputs, the contract of every folder.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from edgekit.export.onnx_data import attach_weights, graph_files
from edgekit.export.onnx_format import (
    DECODER_FILE,
    DESCRIPTION_FILE,
    EMBED_FILE,
    GRAPH_FILES,
    NEWLINE_FILE,
    VISION_FILE,
    Names,
)
from edgekit.model.families import Family, attr_path, eos_ids, head_dim, text_config
from edgekit.model.surgery import num_exit_layers, set_exit_layer

FORMAT_VERSION = 2  # 2: the anyres pinpoints are "grid_pinpoints"; the checkpoint type is no longer recorded


@dataclass(frozen=True)
class OnnxExport:
    folder: Path
    files: tuple[str, ...]  # names inside `folder`
    description: dict[str, Any] = field(repr=False)


# --- wrappers: flat tensors in, flat tensors out ------------------------------------------------------------------
class _Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


def _additive_causal_mask(attention_mask: torch.Tensor, query_len_like: torch.Tensor, dtype) -> torch.Tensor:
    """[B, 1, S, P+S] additive mask: key j is visible to query i (at position P+i) iff j <= P+i and mask[b, j]."""
    key_pos = torch.cumsum(torch.ones_like(attention_mask[0]), 0) - 1  # arange(P+S), traced dynamically
    past_len = attention_mask.shape[1] - query_len_like.shape[0]
    query_pos = torch.cumsum(torch.ones_like(query_len_like), 0) - 1 + past_len
    visible = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype)
    return torch.where(visible, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))


class _Decoder(nn.Module):
    """Language model + LM head over a DynamicCache rebuilt from (and flattened back to) flat past tensors."""

    def __init__(self, model, family: Family, past_layers: list[int]):
        super().__init__()
        self.lm = attr_path(model, family.language_model)
        self.lm_head = model.get_output_embeddings()
        self.text_config = text_config(model.config)
        self.family, self.past_layers, self.cross = family, past_layers, family.cross_attention
        self.num_layers = self.text_config.num_hidden_layers
        if self.cross:
            self.num_vision_tokens = family.vision_tokens_per_tile(model)

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest):
        if self.cross:
            cross_states, cross_mask, *flat_past = rest
        else:
            flat_past = list(rest)
        pairs: list[tuple[Any, Any]] = [(None, None)] * self.num_layers
        for i, layer in enumerate(self.past_layers):
            pairs[layer] = (flat_past[2 * i], flat_past[2 * i + 1])
        cache = DynamicCache(pairs, config=self.text_config)
        mask = _additive_causal_mask(attention_mask, inputs_embeds[0, :, 0], inputs_embeds.dtype)
        extra = {}
        if self.cross:
            dtype = inputs_embeds.dtype
            extra = self.family.cross_attention_lm_inputs(cross_states, cross_mask, self.num_vision_tokens, dtype)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        logits = self.lm_head(out.last_hidden_state)
        presents = []
        for layer in self.past_layers:
            presents += [cache.layers[layer].keys, cache.layers[layer].values]
        return (logits, *presents)


class _Float32Interface(nn.Module):
    """A half-precision module behind float32 inputs and outputs (what float16 conversion's keep_io_types gives)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.dtype = module, next(module.parameters()).dtype

    def forward(self, *args):
        out = self.module(*(a.to(self.dtype) if a.is_floating_point() else a for a in args))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


# --- export ------------------------------------------------------------------------------------------------------
@contextmanager
def _shape_inference_without_weights():
    """The TorchScript exporter's whole-graph ONNX shape inference serializes every parameter once more (1.3x the
    weights, measured), the export's largest transient. Weights carry no value a shape depends on, so it runs on the
    graph alone; the per-node inference that types the scalars is untouched."""
    infer = torch._C._jit_pass_onnx_graph_shape_type_inference
    with mock.patch.object(torch._C, infer.__name__, lambda graph, _params, opset: infer(graph, {}, opset)):
        yield


def _export(module, args: tuple, path: Path, inputs: list, outputs: list, axes: dict, opset: int, external=False):
    if next(module.parameters()).dtype != torch.float32:
        module = _Float32Interface(module)
    with warnings.catch_warnings(), torch.no_grad(), _shape_inference_without_weights():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic and the exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            export_params=False,  # the weights are written by attach_weights, a tensor at a time
            do_constant_folding=False,  # folding would hide which weight a transposed copy came from
            dynamo=False,
        )
    attach_weights(path, module, external)


def _export_vision(vision: nn.Module, inputs: dict, family: Family, path: Path, opset: int) -> None:
    axes = {**family.onnx_vision_axes, Names.IMAGE_FEATURES: family.onnx_features_axes}
    _export(vision, tuple(inputs.values()), path, list(inputs), [Names.IMAGE_FEATURES], axes, opset)


def _vision_inputs(family: Family, inputs: dict) -> dict[str, torch.Tensor]:
    """The vision graph's sample inputs, by name: float pixels; anyres tiles [images, tiles, C, H, W] stacked."""
    sample = {name: inputs[name] for name in family.onnx_vision_axes}
    pixels = sample[Names.PIXEL_VALUES].float()
    sample[Names.PIXEL_VALUES] = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels
    return sample


def _export_embed(model, path: Path, opset: int) -> None:
    n = Names
    ids = torch.tensor([[1, 2, 3]], dtype=torch.long)
    dims = {0: "batch_size", 1: "sequence_length"}
    axes = {n.INPUT_IDS: dims, n.INPUTS_EMBEDS: dims}
    _export(_Embed(model), (ids,), path, [n.INPUT_IDS], [n.INPUTS_EMBEDS], axes, opset, external=True)


def _export_decoder(model, family: Family, cross_states: torch.Tensor | None, path: Path, opset: int) -> None:
    n = Names
    text = text_config(model.config)
    kv_heads, dim = text.num_key_value_heads, head_dim(text)
    batch, seq, past = 1, 3, 2  # traced with a non-empty past; prefill runs with past length 0
    embeds = torch.randn(batch, seq, text.hidden_size)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq)[None]
    layers = family.self_attention_layers(model.config)
    flat_past, past_names, present_names = [], [], []
    for layer in layers:
        for kind in ("key", "value"):
            flat_past.append(torch.randn(batch, kv_heads, past, dim))
            past_names.append(n.past(layer, kind))
            present_names.append(n.present(layer, kind))
    axes: dict[str, dict[int, str]] = {
        n.INPUTS_EMBEDS: {0: "batch_size", 1: "sequence_length"},
        n.ATTENTION_MASK: {0: "batch_size", 1: "total_sequence_length"},
        n.POSITION_IDS: {0: "batch_size", 1: "sequence_length"},
        n.LOGITS: {0: "batch_size", 1: "sequence_length"},
    }
    axes |= {name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names}
    axes |= {name: {0: "batch_size", 2: "total_sequence_length"} for name in present_names}
    args: list[torch.Tensor] = [embeds, mask, positions]
    names = [n.INPUTS_EMBEDS, n.ATTENTION_MASK, n.POSITION_IDS]
    if family.cross_attention:
        assert cross_states is not None
        tiles = family.max_tiles(model.config)
        cross_mask = torch.ones(batch, seq, cross_states.shape[0] // tiles, tiles, dtype=torch.long)
        args += [cross_states.detach().float(), cross_mask]
        names += [n.CROSS_ATTENTION_STATES, n.CROSS_ATTENTION_MASK]
        axes[n.CROSS_ATTENTION_STATES] = {0: "num_images_x_tiles"}
        axes[n.CROSS_ATTENTION_MASK] = {0: "batch_size", 1: "sequence_length", 2: "num_images"}
    decoder, inputs, outputs = _Decoder(model, family, layers), names + past_names, [n.LOGITS, *present_names]
    _export(decoder, tuple(args + flat_past), path, inputs, outputs, axes, opset)


# --- description -------------------------------------------------------------------------------------------------
def graph_io(path: Path) -> dict[str, list[dict]]:
    """Inputs and outputs of an ONNX graph: name, dtype and shape (symbolic dims as names)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": spec(graph.input), "outputs": spec(graph.output)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


_IMAGE_PROCESSOR_KEYS = ("size", "crop_size", "image_mean", "image_std", "rescale_factor", "resample") + tuple(
    f"do_{step}" for step in ("resize", "center_crop", "rescale", "normalize", "convert_rgb", "pad")
)


def _preprocessing(processor, model, family: Family) -> dict[str, Any]:
    ip = processor.image_processor
    keys = (*_IMAGE_PROCESSOR_KEYS, *family.preprocessing_keys)
    out = {"processor_class": type(processor).__name__, "image_processor_class": type(ip).__name__}
    out |= {k: _jsonable(getattr(ip, k)) for k in keys if getattr(ip, k, None) is not None}
    vision = model.config.vision_config
    out |= {"vision_image_size": vision.image_size, "vision_patch_size": vision.patch_size}
    return out


def _host_side(family: Family) -> dict[str, Any]:
    """What a runtime does between the graphs for the family's way of feeding the image (see module doc)."""
    if family.cross_attention:
        return {
            "kind": "cross_attention",
            "steps": [
                "vision_encoder(pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> image_features = "
                "cross_attention_states [images*tiles, patches, d_text]",
                "embed_tokens(input_ids) -> inputs_embeds (image tokens stay ordinary embeddings)",
                "decoder: feed cross_attention_states and the processor's cross_attention_mask rows for the tokens "
                "being processed at every step; a decoded token repeats the last row",
            ],
            "cross_attention_cache": "none: the decoder recomputes cross-attention K/V from cross_attention_states "
            "each step",
        }
    steps = ["vision_encoder(pixel_values) -> image_features [n, tokens, d_text]"]
    if family.anyres:
        steps = [
            "select each image's tiles: pixel_values[i, :num_tiles(image_sizes[i])], num_tiles = 1 + grid cells "
            "of the best pinpoint resolution (select_best_resolution)",
            "vision_encoder(stacked tiles) -> per-tile features [tiles, tokens, d_text]",
            "per image: base tile features, then the grid tiles arranged as [d, rows*h, cols*w], unpadded to the "
            "image's aspect ratio, a column of image_newline appended to every row, flattened row-major "
            "(transformers LlavaNextModel.pack_image_features); image_newline is in image_newline.npy",
        ]
    return {
        "kind": "merge_image_tokens",
        "steps": steps
        + [
            "embed_tokens(input_ids) -> inputs_embeds; the rows at input_ids == image_token_id are replaced, in "
            "order, by the (packed) image features",
        ],
    }


def _describe(model, processor, family: Family, exit_layer: int, folder: Path, opset: int) -> dict[str, Any]:
    text = text_config(model.config)
    tokenizer = processor.tokenizer
    desc: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "exit_layer": exit_layer,
        "num_exit_layers": num_exit_layers(model),
        "exit_layer_convention": "1-based vision block k = HF hidden_states[k]",
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
        "opset": opset,
        "graphs": {name: graph_io(folder / name) for name in GRAPH_FILES if (folder / name).is_file()},
        "decoder": {
            "past_layers": family.self_attention_layers(model.config),
            "num_hidden_layers": text.num_hidden_layers,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": head_dim(text),
            "hidden_size": text.hidden_size,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_position_embeddings,
            "past_layout": "[batch, num_key_value_heads, past_sequence_length, head_dim]; prefill with length 0",
            "position_ids": "cumsum(attention_mask) - 1 for the tokens being processed",
        },
        "host_side": _host_side(family),
        "preprocessing": _preprocessing(processor, model, family),
        "vision_feature_select_strategy": family.feature_select_strategy(model.config),
        "chat_template": processor.chat_template,
        "image_token": getattr(processor, "image_token", None),
        "image_token_id": family.image_token_id(model.config),
        "eos_token_ids": eos_ids(model),
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    desc |= family.onnx_sections(model)
    if family.anyres:
        desc["anyres"]["image_newline_file"] = NEWLINE_FILE
    return desc


def export_onnx(
    model, processor, family: Family, exit_layer: int, out_dir, opset: int = 17, sample_inputs=None, parts=GRAPH_FILES
) -> OnnxExport:
    """Cut the model's vision tower at `exit_layer` (in memory with `set_exit_layer`; the model stays cut) and write
    the graphs plus `edgekit_onnx.json` into `out_dir`. `sample_inputs` are processor outputs to trace the vision
    graph with (a blank image through `processor` when omitted). `parts` limits which graphs are (re)written, e.g.
    only the vision graph for a scan over exit layers; the JSON describes every graph in the folder."""
    family.check_config(model.config)
    unknown = set(parts) - set(GRAPH_FILES)
    if unknown:
        raise ValueError(f"unknown graphs {sorted(unknown)}; choose from {', '.join(GRAPH_FILES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_exit_layer(model, exit_layer)
    model.eval()
    inputs = dict(sample_inputs) if sample_inputs is not None else _blank_inputs(processor)
    vision, vision_inputs = family.vision_graph(model), _vision_inputs(family, inputs)
    cross_states = None
    if family.cross_attention:  # the decoder is traced with the image's real cross-attention states
        with torch.no_grad():
            cross_states = vision(*vision_inputs.values())
    if VISION_FILE in parts:
        _export_vision(vision, vision_inputs, family, out / VISION_FILE, opset)
    if EMBED_FILE in parts:
        _export_embed(model, out / EMBED_FILE, opset)
    if DECODER_FILE in parts:
        _export_decoder(model, family, cross_states, out / DECODER_FILE, opset)
    files = [file.name for name in GRAPH_FILES if (out / name).is_file() for file in graph_files(out / name)]
    if family.anyres:  # the newline embedding the host packs between tile rows
        np.save(out / NEWLINE_FILE, family.image_newline(model).detach().float().numpy())
        files.append(NEWLINE_FILE)
    desc = _describe(model, processor, family, exit_layer, out, opset)
    (out / DESCRIPTION_FILE).write_text(json.dumps(desc, indent=2))
    files.append(DESCRIPTION_FILE)
    return OnnxExport(out, tuple(files), desc)


def _blank_inputs(processor) -> dict:
    from PIL import Image

    image = Image.new("RGB", (64, 48), (127, 127, 127))
    token = getattr(processor, "image_token", None) or "<image>"
    return dict(processor(images=image, text=f"{token} describe", return_tensors="pt"))
