"""Model families: every difference between LLaVA-1.5, LLaVA-NeXT and Llama 3.2 Vision lives in this file.

One convention for layers everywhere: exit layer k (1..L) is the output of vision block k, HF `hidden_states[k]`
(index 0 is the embedding after the pre-norm).

- LLaVA-1.5 / LLaVA-NeXT: the CLIP tower is one stack of L blocks; the projector reads block k's patch tokens.
  The default is HF `vision_feature_layer` (-2 -> 23 of 24).
- Llama 3.2 Vision (Mllama): the tower is a local stack of L blocks (32), then a gated global stack (8 blocks),
  whose output is concatenated with taps of local blocks 4, 8, 16, 24 and 31. Exit layer k cuts the LOCAL stack after
  block k; the global stack stays (it is the tower's head, as the projector is LLaVA's) and reads block k's output, and
  taps of blocks past k read block k instead. The default is L: the whole local stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from edgekit.errors import UserError


def attr_path(obj: Any, path: str) -> Any:
    """obj.a.b.c for path 'a.b.c'."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def text_config(config):
    """The language model's config (the decoder's, where the text side has an encoder too)."""
    return config.get_text_config(decoder=True)


def head_dim(text) -> int:
    """Width of one attention head of a text config; configs without `head_dim` imply hidden_size / heads."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def eos_ids(model) -> list[int]:
    """The ids that end generation: the generation config's, else the text config's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = text_config(model.config).eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


@dataclass(frozen=True)
class Family:
    """What edgekit needs to know of one model family; other modules read config names and module paths only here.
    Defaults and methods are LLaVA-1.5's: as in optimum's normalized configs, an entry of `FAMILIES` declares what
    differs, and a subclass overrides only the maths that differs (with the class-level facts that follow from it)."""

    name: str  # human name, used in messages and README
    model_types: tuple[str, ...]  # config.model_type values it accepts
    tower: str = "model.vision_tower"  # attribute path from the full model to the vision tower
    blocks: str = "encoder"  # attribute path from the tower to its module holding `.layers` (the exitable stack)
    projector: str = "model.multi_modal_projector"  # attribute path from the full model to the projector
    language_model: str = "model.language_model"  # attribute path from the full model to the decoder stack
    image_inputs: tuple[str, ...] = ("pixel_values",)  # processor outputs that carry the image (the rest are text)
    gguf_language_model: bool = True  # llama.cpp runs the language model, so an LM GGUF can be written
    gguf_projector: str | None = None  # clip.cpp projector type of the mmproj edgekit writes; None: it writes none
    # Set by the subclass whose maths they name, which then also provides image_newline (anyres), or max_tiles,
    # vision_tokens_per_tile and cross_attention_lm_inputs (cross_attention).
    anyres: ClassVar[bool] = False  # images are a base tile plus a grid of tiles, packed with newline embeddings
    cross_attention: ClassVar[bool] = False  # the image reaches the LM through cross-attention, not image tokens
    # Why onnxruntime-genai cannot run the ONNX folder (None: it can, and the export writes its files).
    ortgenai_unsupported: ClassVar[str | None] = None
    preprocessing_keys: ClassVar[tuple[str, ...]] = ()  # image-processor settings only this family has
    # ONNX vision graph: its inputs (processor output names) with their dynamic axes, then the image features' axes
    onnx_vision_axes: ClassVar[dict[str, dict[int, str]]] = {"pixel_values": {0: "num_tiles"}}
    onnx_features_axes: ClassVar[dict[int, str]] = {0: "num_tiles"}

    # --- config names ------------------------------------------------------------------------------------------
    def check_config(self, config) -> None:
        if config.model_type not in self.model_types:
            raise UserError(f"model_type {config.model_type!r} is not {self.name} ({'/'.join(self.model_types)})")

    def manifest_fields(self, config) -> dict[str, str]:
        """How an artifact's manifest names the model's family."""
        return {"family": self.name, "model_type": config.model_type}

    def image_token_id(self, config) -> int:
        """The prompt token that stands for the image (LLaVA: replaced by its features; Mllama: marks its place)."""
        return int(config.image_token_id)

    def feature_select_strategy(self, config) -> str | None:
        """HF's rule for the tokens the projector reads: 'default' drops CLS, 'full' keeps it."""
        return config.vision_feature_select_strategy

    def patch_tokens(self, config, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states of a vision layer that the projector reads."""
        return hidden[:, 1:] if self.feature_select_strategy(config) == "default" else hidden

    def self_attention_layers(self, config) -> list[int]:
        """The decoder layers that attend to (and cache keys and values of) the tokens."""
        return list(range(text_config(config).num_hidden_layers))

    # --- the exitable stack -------------------------------------------------------------------------------------
    def num_layers(self, config) -> int:
        """L, the number of exitable layers, from the config."""
        return config.vision_config.num_hidden_layers

    def default_exit(self, config) -> int:
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise UserError(f"vision_feature_layer={layer}: multi-layer feature selection is not supported")
        return layer % (self.num_layers(config) + 1)

    def stack(self, model) -> nn.Module:
        """The module whose `.layers` are the exitable blocks."""
        return attr_path(attr_path(model, self.tower), self.blocks)

    def exit_config(self, config, k: int) -> dict[str, Any]:
        """Config fields (on the vision config, prefixed `vision_config.`) that make a k-block tower exit at k."""
        # A non-negative index: -1 would also select block k, but a left-over -2 would silently shift by one.
        return {"vision_config.num_hidden_layers": k, "vision_feature_layer": k}

    def apply_exit_to_modules(self, model, config_values: dict[str, Any]) -> None:
        """Some towers copy config values into attributes at init; keep them in step (nothing to do for CLIP)."""

    # --- features ----------------------------------------------------------------------------------------------
    def _tower_hidden_states(self, model, inputs: dict) -> tuple[torch.Tensor, ...]:
        """One forward of the tower: hidden_states[0..L]."""
        tower = attr_path(model, self.tower)
        pixel_values = inputs["pixel_values"].to(tower.dtype)
        return tower(pixel_values, output_hidden_states=True).hidden_states

    def _project(self, model, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Projected image features [n_image_tokens, d_text] of one layer's hidden states."""
        return attr_path(model, self.projector)(self.patch_tokens(model.config, hidden)).flatten(0, 1)

    def features_per_layer(self, model, inputs: dict, layers: list[int]) -> dict[int, torch.Tensor]:
        """Projected image features of every layer in `layers` from ONE forward pass of the vision tower."""
        hidden_states = self._tower_hidden_states(model, inputs)
        return {k: self._project(model, hidden_states[k], inputs) for k in layers}

    def lm_inputs(self, model, inputs: dict, features: torch.Tensor) -> dict:
        """Keyword arguments for model(...) / model.generate(...) that feed `features` in place of the image."""
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == self.image_token_id(model.config)).unsqueeze(-1).expand_as(embeds)
        if int(mask.sum()) != features.numel():
            raise ValueError(f"{int(mask[..., 0].sum())} image tokens in the prompt, {features.shape[0]} features")
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}

    def generate(self, model, lm_inputs: dict, **kwargs) -> torch.Tensor:
        """model.generate over `lm_inputs`; returns the new tokens only."""
        generated = model.generate(**lm_inputs, **kwargs)
        # generate() returns only new tokens when fed inputs_embeds, prompt + new tokens when fed input_ids
        return generated[:, lm_inputs["input_ids"].shape[1] :] if "input_ids" in lm_inputs else generated

    # --- ONNX export ---------------------------------------------------------------------------------------------
    def vision_graph(self, model) -> nn.Module:
        """The tower as cut (its last block is the exit) + projector, taking `onnx_vision_axes`' inputs in order."""
        return _ProjectedPatches(model, self)

    def onnx_sections(self, model) -> dict[str, Any]:
        """The family's own sections of the ONNX description (none for LLaVA-1.5)."""
        return {}


class _ProjectedPatches(nn.Module):
    """LLaVA's vision graph: tower -> patch tokens -> projector, for LLaVA-1.5 images and LLaVA-NeXT tiles alike."""

    def __init__(self, model, family: Family):
        super().__init__()
        self.tower = attr_path(model, family.tower)
        self.projector = attr_path(model, family.projector)
        self.family, self.config = family, model.config

    def forward(self, pixel_values):
        # The tower holds exactly k blocks, so its last hidden state is block k's output = hidden_states[k].
        hidden = self.tower(pixel_values).last_hidden_state
        return self.projector(self.family.patch_tokens(self.config, hidden))


@dataclass(frozen=True)
class LlavaNextFamily(Family):
    """Anyres: the tower sees the base image plus tiles; features are unpadded and packed with newline tokens."""

    anyres = True
    ortgenai_unsupported = "its anyres packing runs on the host, where onnxruntime-genai has no step (see README)"
    preprocessing_keys = ("image_grid_pinpoints",)

    def image_newline(self, model) -> torch.Tensor:
        """The learned embedding closing every row of a packed tile grid."""
        return model.model.image_newline

    def _tower_hidden_states(self, model, inputs: dict) -> tuple[torch.Tensor, ...]:
        pixel_values = inputs["pixel_values"]
        if pixel_values.dim() == 5:  # [images, tiles, C, H, W], padded to the most tiles: keep each image's own
            counts = self._tiles_per_image(model, inputs)
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        tower = attr_path(model, self.tower)
        return tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states

    def _project(self, model, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        projected = attr_path(model, self.projector)(self.patch_tokens(model.config, hidden))
        per_image = torch.split(projected, self._tiles_per_image(model, inputs))
        strategy, newline = self.feature_select_strategy(model.config), self.image_newline(model)
        packed, _ = model.model.pack_image_features(
            per_image, inputs["image_sizes"], vision_feature_select_strategy=strategy, image_newline=newline
        )
        return torch.cat(packed)

    @staticmethod
    def _tiles_per_image(model, inputs: dict) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
            for size in inputs["image_sizes"]
        ]

    def onnx_sections(self, model) -> dict[str, Any]:
        config = model.config
        tile = config.vision_config.image_size
        side = tile // config.vision_config.patch_size
        return {"anyres": {"grid_pinpoints": config.image_grid_pinpoints, "tile_size": tile, "tokens_per_side": side}}


class _ReplayLocalStack(nn.Module):
    """Stands in for Mllama's local stack and returns hidden states computed earlier, so the rest of HF's own
    vision forward (norm, global stack, taps) runs unchanged for each exit layer."""

    def __init__(self, hidden_states: list[torch.Tensor], k: int):
        super().__init__()
        self.hidden_states, self.k = hidden_states, k

    def forward(self, hidden_states, attention_mask=None):
        return BaseModelOutput(last_hidden_state=self.hidden_states[self.k - 1], hidden_states=self.hidden_states)


class _CrossAttentionStates(nn.Module):
    """Mllama's tower (local stack cut at k, global stack kept) -> projector: the cross-attention states
    [images*tiles, patches, d_text]. Both the feature path and the ONNX vision graph run it."""

    def __init__(self, model, family: Family):
        super().__init__()
        self.tower = attr_path(model, family.tower)
        self.projector = attr_path(model, family.projector)

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        vision = self.tower(
            pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
        ).last_hidden_state
        projected = self.projector(vision)
        return projected.reshape(-1, vision.shape[-2], projected.shape[-1])


@dataclass(frozen=True)
class MllamaFamily(Family):
    """Llama 3.2 Vision: exit k cuts the local stack; the global stack and the taps are kept (see module doc)."""

    cross_attention = True
    ortgenai_unsupported = "onnxruntime-genai runs no cross-attention decoder (see README)"
    preprocessing_keys = ("max_image_tiles",)
    onnx_vision_axes = {
        name: {0: "batch_size", 1: "num_images"} for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    }
    onnx_features_axes = {0: "num_images_x_tiles"}

    def feature_select_strategy(self, config) -> str | None:
        return None  # the projector reads the tower's whole output

    def self_attention_layers(self, config) -> list[int]:
        cross = set(text_config(config).cross_attention_layers)
        return [i for i in super().self_attention_layers(config) if i not in cross]

    def default_exit(self, config) -> int:
        return self.num_layers(config)

    def exit_config(self, config, k: int) -> dict[str, Any]:
        # Clamping composes (min(min(i, k-1), j-1) = min(i, j-1)), so a cut tower can be cut again.
        taps = [min(i, k - 1) for i in config.vision_config.intermediate_layers_indices]
        return {"vision_config.num_hidden_layers": k, "vision_config.intermediate_layers_indices": taps}

    def apply_exit_to_modules(self, model, config_values: dict[str, Any]) -> None:
        tower = attr_path(model, self.tower)
        tower.intermediate_layers_indices = config_values["vision_config.intermediate_layers_indices"]

    def features_per_layer(self, model, inputs: dict, layers: list[int]) -> dict[int, torch.Tensor]:
        tower = attr_path(model, self.tower)
        local = tower.transformer
        captured: list[torch.Tensor] = []
        hooks = [block.register_forward_hook(lambda m, a, out: captured.append(out)) for block in local.layers]
        try:  # one real forward of the local stack; its outputs are replayed for every exit layer below
            self._vision_forward(model, inputs)
        finally:
            for h in hooks:
                h.remove()
        out = {}
        saved_taps = tower.intermediate_layers_indices
        try:
            for k in layers:
                tower.transformer = _ReplayLocalStack(captured[:k], k)
                tower.intermediate_layers_indices = [min(i, k - 1) for i in saved_taps]
                out[k] = self._vision_forward(model, inputs)
        finally:
            tower.transformer, tower.intermediate_layers_indices = local, saved_taps
        return out

    def _vision_forward(self, model, inputs: dict) -> torch.Tensor:
        pixel_values = inputs["pixel_values"].to(attr_path(model, self.tower).dtype)
        return self.vision_graph(model)(pixel_values, inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])

    def lm_inputs(self, model, inputs: dict, features: torch.Tensor) -> dict:
        text = {name: inputs[name] for name in ("input_ids", "attention_mask", "cross_attention_mask")}
        return text | {"cross_attention_states": features}

    def generate(self, model, lm_inputs: dict, **kwargs) -> torch.Tensor:
        # The cross-attention layers cache K/V of the image at prefill and would append a second copy if given the
        # states again, so pass them to the first step only (as generate() does with pixel_values).
        prepare = model.prepare_inputs_for_generation

        def prefill_only(*args, **kwargs):  # named **kwargs: generate() validates arguments against it
            step_inputs = prepare(*args, **kwargs)
            if not kwargs.get("is_first_iteration", False):
                step_inputs["cross_attention_states"] = None
            return step_inputs

        model.prepare_inputs_for_generation = prefill_only
        try:
            return super().generate(model, lm_inputs, **kwargs)
        finally:
            del model.prepare_inputs_for_generation  # back to the class method

    # --- ONNX export: the decoder has no cross-attention cache; it recomputes K/V from the states every step ------
    def vision_graph(self, model) -> nn.Module:
        return _CrossAttentionStates(model, self)

    def max_tiles(self, config) -> int:
        return config.vision_config.max_num_tiles

    def vision_tokens_per_tile(self, model) -> int:
        return attr_path(model, self.tower).num_patches

    def cross_attention_lm_inputs(self, states, mask, tokens_per_tile: int, dtype) -> dict[str, torch.Tensor]:
        """The language model's cross-attention arguments from the states and the processor's mask rows."""
        from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

        prepared, full = _prepare_cross_attention_mask(mask, tokens_per_tile, dtype)
        return dict(cross_attention_states=states, cross_attention_mask=prepared, full_text_row_masked_out_mask=full)

    def onnx_sections(self, model) -> dict[str, Any]:
        return {
            "cross_attention": {
                "cross_attention_layers": list(text_config(model.config).cross_attention_layers),
                "max_num_tiles": self.max_tiles(model.config),
                "num_vision_tokens_per_tile": self.vision_tokens_per_tile(model),
                "cross_attention_mask": "processor output [batch, seq, num_images, max_num_tiles] (int64), rows for "
                "the tokens being processed",
            }
        }


FAMILIES: tuple[Family, ...] = (
    Family(name="LLaVA-1.5", model_types=("llava",), gguf_projector="mlp"),
    # No mmproj: edgekit's mmproj writer has no anyres and would see the base tile only (the hybrid runtime runs it).
    LlavaNextFamily(name="LLaVA-NeXT", model_types=("llava_next",), image_inputs=("pixel_values", "image_sizes")),
    MllamaFamily(
        name="Llama 3.2 Vision",
        model_types=("mllama",),
        tower="model.vision_model",
        blocks="transformer",
        image_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"),
        gguf_language_model=False,
    ),
)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_for(config) -> Family:
    """The family of a transformers config, or a UserError listing the supported ones."""
    return _family_of(getattr(config, "model_type", None))


def family_for_config_json(config: dict) -> Family:
    """The family a config.json's contents name, read before AutoConfig (which rejects model types it does not know)."""
    return _family_of(config.get("model_type"))


def _family_of(model_type: str | None) -> Family:
    if model_type not in _BY_MODEL_TYPE:
        raise UserError(f"unsupported model_type {model_type!r}; supported families: {supported()}")
    return _BY_MODEL_TYPE[model_type]
