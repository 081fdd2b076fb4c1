"""ONNX Runtime generate loop over an `edgekit.export.onnx` folder: numpy + onnxruntime only, greedy, own KV cache.

Host-side work between the graphs, by family (recorded in `edgekit_onnx.json` under `host_side`):
- LLaVA-1.5: image features replace, in order, the embeddings at `input_ids == image_token_id`.
- LLaVA-NeXT: each image's anyres tiles (count from `image_sizes` and the pinpoints) go through the vision graph
  stacked; the per-tile features are unpadded and packed with `image_newline` here, in numpy, exactly as transformers'
  `LlavaNextModel.pack_image_features` does, then merged as for LLaVA-1.5. (Exporting the packing would mean
  data-dependent shapes per image size inside the graph; a dozen lines of numpy is the cleaner split.)
- Llama 3.2 Vision: the vision graph's output is the cross-attention states, fed to the decoder at every step with
  the processor's `cross_attention_mask` rows for the tokens being processed (a decoded token repeats the last row).

Float16 graphs on the CPU provider: x86 CPUs have no float16 kernels, so onnxruntime inserts a Cast to float32 before
each node, and its default optimizations fold those casts at load: a float32 copy of every weight, twice the graph's
size (a 7B fp16 decoder needs about 27 GB). That is the fast way, and it is taken when the copy would use at most
half the memory available. Otherwise `cpu_float16_options` keeps the weights in float16 (memory-mapped from the
external data) and casts each one when its node runs, in priority order without an arena or buffer reuse: memory
stays near the graph's size, and decoding is several times slower (README: Real sizes). Providers that run float16
natively (CUDA, TensorRT) are unaffected.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.export.onnx_format import (
    DECODER_FILE,
    DESCRIPTION_FILE,
    EMBED_FILE,
    VISION_FILE,
    Names,
    float16_graphs,
)
from edgekit.machine import available_memory, working_set_allowance

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _np(value) -> np.ndarray:
    """A processor output (torch tensor, numpy array or list) as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# --- LLaVA-NeXT anyres, host side -----------------------------------------------------------------------------------
def select_best_resolution(original_size: Sequence[int], possible_resolutions: Sequence[Sequence[int]]) -> tuple:
    """The pinpoint (height, width) that keeps the most of the image and wastes the least (as transformers)."""
    original_height, original_width = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit


def anyres_grid(image_size: Sequence[int], pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of (height, width)."""
    height, width = select_best_resolution([int(v) for v in image_size], pinpoints)
    return math.ceil(height / tile), math.ceil(width / tile)


def unpad(features: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
    """Crop [d, H, W] features back to the image's aspect ratio (transformers' `unpad_image`)."""
    original_height, original_width = (int(v) for v in original_size)
    current_height, current_width = features.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return features[:, padding : current_height - padding, :]
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return features[:, :, padding : current_width - padding]


def pack_anyres(tiles: np.ndarray, image_size: Sequence[int], anyres: Mapping, newline: np.ndarray) -> np.ndarray:
    """One image's per-tile features [tiles, side*side, d] -> the packed sequence [n, d] the LM reads."""
    if tiles.shape[0] == 1:
        return np.concatenate([tiles[0], newline[None].astype(tiles.dtype)])
    side, d = anyres["tokens_per_side"], tiles.shape[-1]
    rows, cols = anyres_grid(image_size, anyres["grid_pinpoints"], anyres["tile_size"])
    grid = tiles[1:].reshape(rows, cols, side, side, d).transpose(4, 0, 2, 1, 3).reshape(d, rows * side, cols * side)
    grid = unpad(grid, image_size)
    column = np.broadcast_to(newline.astype(grid.dtype)[:, None, None], (d, grid.shape[1], 1))
    grid = np.concatenate([grid, column], axis=-1).reshape(d, -1).T
    return np.concatenate([tiles[0], grid])


def default_session_options():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: fp16 graphs on CPU log a warning per node they upcast
    return opts


def room_for_float32(folder: Path, graph: str) -> bool:
    """Whether a float32 copy of `graph`'s float16 weights (twice its files) is within the working set allowed beside
    the folder's weights (`machine.working_set_allowance`: small models only) and half the memory available."""
    folder = Path(folder)
    weights = sum(path.stat().st_size for path in folder.glob("*.onnx*"))  # graphs and their .onnx_data
    copy = 2 * sum(path.stat().st_size for path in folder.glob(graph + "*"))
    available = available_memory()
    return copy <= working_set_allowance(weights) and (available is None or copy <= available / 2)


def cpu_float16_options(opts):
    """`opts` set to cast float16 weights per use on the CPU provider instead of holding a float32 copy (above)."""
    import onnxruntime as ort

    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # constant folding makes the copy
    opts.enable_cpu_mem_arena = False  # an arena would keep the largest casts' memory after they are freed
    opts.enable_mem_reuse = False  # reused buffers outlive the casts too (7B prefill: 16.4 -> 15.0 GiB)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # casts run next to their consumers, not all first
    return opts


class OnnxVLM:
    """The three graphs of an exported folder and a greedy generate loop with its own KV cache."""

    def __init__(
        self,
        folder,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        new_session_options: Callable[[], Any] | None = None,
    ):
        """`new_session_options` returns fresh onnxruntime SessionOptions for each graph's session (default:
        `default_session_options`)."""
        self.folder = Path(folder)
        self.config: dict[str, Any] = json.loads((self.folder / DESCRIPTION_FILE).read_text())
        self.providers = list(providers)
        self.new_session_options = new_session_options or default_session_options
        self.float16 = float16_graphs(self.config)
        self.cross = "cross_attention" in self.config
        self.anyres = self.config.get("anyres")
        self.newline = np.load(self.folder / self.anyres["image_newline_file"]) if self.anyres else None
        self._past_layers = list(self.config["decoder"]["past_layers"])

    # Sessions open on first use, so a folder holding only the vision graph (a scan over exit layers) works too.
    @cached_property
    def vision(self):
        return self._session(VISION_FILE)

    @cached_property
    def embed(self):
        return self._session(EMBED_FILE)

    @cached_property
    def decoder(self):
        return self._session(DECODER_FILE)

    @cached_property
    def _decoder_types(self) -> dict[str, type]:
        return {i.name: _ORT_DTYPES[i.type] for i in self.decoder.get_inputs()}

    def _session(self, name: str):
        import onnxruntime as ort

        opts = self.new_session_options()
        if (
            name in self.float16
            and self.providers == ["CPUExecutionProvider"]
            and not room_for_float32(self.folder, name)
        ):
            cpu_float16_options(opts)
        return ort.InferenceSession(str(self.folder / name), sess_options=opts, providers=self.providers)

    # --- images ------------------------------------------------------------------------------------------------
    def vision_feeds(self, inputs: Mapping) -> dict[str, np.ndarray]:
        """The vision graph's feeds for processor-built inputs (LLaVA-NeXT: every image's real tiles, stacked)."""
        types = {i.name: _ORT_DTYPES[i.type] for i in self.vision.get_inputs()}
        pixels = _np(inputs[Names.PIXEL_VALUES])
        if self.anyres and pixels.ndim == 5:  # [images, max tiles, C, H, W]: keep each image's own tiles
            counts = self.tiles_per_image(inputs)
            pixels = np.concatenate([p[:n] for p, n in zip(pixels, counts)])
        feeds = {Names.PIXEL_VALUES: pixels}
        if self.cross:
            feeds |= {k: _np(inputs[k]) for k in (Names.ASPECT_RATIO_IDS, Names.ASPECT_RATIO_MASK)}
        return {k: v.astype(types[k]) for k, v in feeds.items()}

    def tiles_per_image(self, inputs: Mapping) -> list[int]:
        a = self.anyres
        return [
            int(np.prod(anyres_grid(s, a["grid_pinpoints"], a["tile_size"]))) + 1
            for s in _np(inputs[Names.IMAGE_SIZES])
        ]

    def vision_outputs(self, inputs: Mapping) -> np.ndarray:
        """The vision graph's own output: [images or tiles, tokens, d_text] (Mllama: the cross-attention states)."""
        return self.vision.run([Names.IMAGE_FEATURES], self.vision_feeds(inputs))[0].astype(np.float32)

    def image_features(self, inputs: Mapping) -> np.ndarray:
        """What the language model consumes, laid out as `Family.features_per_layer` returns it:
        LLaVA [image tokens, d]; LLaVA-NeXT the packed [tokens incl. newlines, d]; Mllama [tiles, patches, d]."""
        out = self.vision_outputs(inputs)
        if self.cross:
            return out
        if self.anyres:
            per_image = np.split(out, np.cumsum(self.tiles_per_image(inputs))[:-1])
            sizes = _np(inputs[Names.IMAGE_SIZES])
            return np.concatenate([pack_anyres(t, s, self.anyres, self.newline) for t, s in zip(per_image, sizes)])
        return out.reshape(-1, out.shape[-1])

    # --- text --------------------------------------------------------------------------------------------------
    def embed_ids(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embed.run([Names.INPUTS_EMBEDS], {Names.INPUT_IDS: input_ids.astype(np.int64)})[0]

    def prompt_embeds(self, inputs: Mapping, features: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings of the prompt with the image features merged at the image tokens (not for Mllama)."""
        input_ids = _np(inputs[Names.INPUT_IDS])
        embeds = self.embed_ids(input_ids)
        if self.cross:
            return embeds
        features = self.image_features(inputs) if features is None else features
        positions = input_ids == self.config["image_token_id"]
        if int(positions.sum()) != features.shape[0]:
            raise ValueError(f"{int(positions.sum())} image tokens in the prompt, {features.shape[0]} image features")
        embeds[positions] = features.astype(embeds.dtype)
        return embeds

    def decoder_step(self, embeds, attention_mask, position_ids, past, cross=None):
        """One run of the merged decoder: (logits [batch, seq, vocab], the new past by input name).
        `cross` is (cross_attention_states, cross_attention_mask rows of these tokens), Mllama only."""
        t = self._decoder_types
        feeds = {
            Names.INPUTS_EMBEDS: embeds.astype(t[Names.INPUTS_EMBEDS]),
            Names.ATTENTION_MASK: attention_mask.astype(t[Names.ATTENTION_MASK]),
            Names.POSITION_IDS: position_ids.astype(t[Names.POSITION_IDS]),
        }
        if cross is not None:
            feeds[Names.CROSS_ATTENTION_STATES] = cross[0].astype(t[Names.CROSS_ATTENTION_STATES])
            feeds[Names.CROSS_ATTENTION_MASK] = cross[1].astype(t[Names.CROSS_ATTENTION_MASK])
        feeds |= past
        pairs = [(Names.past(i, k), Names.present(i, k)) for i in self._past_layers for k in ("key", "value")]
        logits, *presents = self.decoder.run([Names.LOGITS] + [present for _, present in pairs], feeds)
        return logits, {past_name: p for (past_name, _), p in zip(pairs, presents)}

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        d = self.config["decoder"]
        past = {}
        for layer in self._past_layers:
            for kind in ("key", "value"):
                name = Names.past(layer, kind)
                past[name] = np.zeros((batch, d["num_key_value_heads"], 0, d["head_dim"]), self._decoder_types[name])
        return past

    def generate(
        self,
        inputs: Mapping,
        max_new_tokens: int = 32,
        eos_token_ids: Sequence[int] | None = None,
        features: np.ndarray | None = None,
        stamps: list[float] | None = None,
    ) -> np.ndarray:
        """Greedy decoding: prefill the prompt (past length 0), then one token at a time with the KV cache.
        Returns the new token ids [batch, n]; a row stops after its first eos (`eos_token_ids`, default the
        folder's; pass () to never stop early) and is padded with pad_token_id after it. `stamps`, if given, gets
        the time (perf_counter) at which each decoder run ended: the prefill, then each step."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        eos = list(self.config["eos_token_ids"] if eos_token_ids is None else eos_token_ids)
        pad = self.config.get("pad_token_id") or 0
        attention_mask = _np(inputs[Names.ATTENTION_MASK]).astype(np.int64)
        batch = attention_mask.shape[0]
        cross = None
        if self.cross:
            states = self.vision_outputs(inputs) if features is None else features
            cross_mask = _np(inputs[Names.CROSS_ATTENTION_MASK]).astype(np.int64)
            cross = (states, cross_mask)
            embeds = self.embed_ids(_np(inputs[Names.INPUT_IDS]))
        else:
            embeds = self.prompt_embeds(inputs, features)
        positions = np.cumsum(attention_mask, -1) - 1
        positions[attention_mask == 0] = 1
        logits, past = self.decoder_step(embeds, attention_mask, positions, self.empty_past(batch), cross)
        stamps = [] if stamps is None else stamps
        stamps.append(time.perf_counter())
        out = np.full((batch, max_new_tokens), pad, dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        last_position = positions[:, -1:]
        n = 0
        for n in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            token = np.where(done, pad, token)
            out[:, n] = token
            done |= np.isin(token, eos)
            if done.all() or n == max_new_tokens - 1:
                break
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), np.int64)], -1)
            last_position = last_position + 1
            if cross is not None:
                cross = (cross[0], cross[1][:, -1:])
            logits, past = self.decoder_step(self.embed_ids(token[:, None]), attention_mask, last_position, past, cross)
            stamps.append(time.perf_counter())
        return out[:, : n + 1]
