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
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from edgekit.errors import UserError


def attr_path(obj: Any, path: str) -> Any:
    """obj.a.b.c for path 'a.b.c'."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Family:
    """What edgekit needs to know of one model family; subclasses only where the maths differs."""

    name: str  # human name, used in messages and README
    model_types: tuple[str, ...]  # config.model_type values it accepts
    model_class: str  # transformers class of the full model
    tower: str  # attribute path from the full model to the vision tower
    blocks: str  # attribute path from the tower to its module holding `.layers` (the exitable stack)
    projector: str  # attribute path from the full model to the projector
    gguf_projector: str | None  # clip.cpp projector type; None: llama.cpp cannot run this family
    onnx_image_inputs: tuple[str, ...]  # processor outputs the vision graph takes

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
        if model.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # LLaVA drops CLS
        return attr_path(model, self.projector)(hidden).flatten(0, 1)

    def features_per_layer(self, model, inputs: dict, layers: list[int]) -> dict[int, torch.Tensor]:
        """Projected image features of every layer in `layers` from ONE forward pass of the vision tower."""
        hidden_states = self._tower_hidden_states(model, inputs)
        return {k: self._project(model, hidden_states[k], inputs) for k in layers}

    def lm_inputs(self, model, inputs: dict, features: torch.Tensor) -> dict:
        """Keyword arguments for model(...) / model.generate(...) that feed `features` in place of the image."""
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(mask.sum()) != features.numel():
            raise ValueError(f"{int(mask[..., 0].sum())} image tokens in the prompt, {features.shape[0]} features")
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}

    def generate(self, model, lm_inputs: dict, **kwargs) -> torch.Tensor:
        """model.generate over `lm_inputs`; returns the new tokens only."""
        generated = model.generate(**lm_inputs, **kwargs)
        # generate() returns only new tokens when fed inputs_embeds, prompt + new tokens when fed input_ids
        return generated[:, lm_inputs["input_ids"].shape[1] :] if "input_ids" in lm_inputs else generated


@dataclass(frozen=True)
class LlavaNextFamily(Family):
    """Anyres: the tower sees the base image plus tiles; features are unpadded and packed with newline tokens."""

    def _tower_hidden_states(self, model, inputs: dict) -> tuple[torch.Tensor, ...]:
        pixel_values = inputs["pixel_values"]
        if pixel_values.dim() == 5:  # [images, tiles, C, H, W], padded to the most tiles: keep each image's own
            counts = self._tiles_per_image(model, inputs)
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        tower = attr_path(model, self.tower)
        return tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states

    def _project(self, model, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        strategy = model.config.vision_feature_select_strategy
        if strategy == "default":
            hidden = hidden[:, 1:]
        per_image = torch.split(attr_path(model, self.projector)(hidden), self._tiles_per_image(model, inputs))
        packed, _ = model.model.pack_image_features(
            per_image, inputs["image_sizes"], vision_feature_select_strategy=strategy,
            image_newline=model.model.image_newline,
        )  # fmt: skip
        return torch.cat(packed)

    @staticmethod
    def _tiles_per_image(model, inputs: dict) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
            for size in inputs["image_sizes"]
        ]


class _ReplayLocalStack(nn.Module):
    """Stands in for Mllama's local stack and returns hidden states computed earlier, so the rest of HF's own
    vision forward (norm, global stack, taps) runs unchanged for each exit layer."""

    def __init__(self, hidden_states: list[torch.Tensor], k: int):
        super().__init__()
        self.hidden_states, self.k = hidden_states, k

    def forward(self, hidden_states, attention_mask=None):
        return BaseModelOutput(last_hidden_state=self.hidden_states[self.k - 1], hidden_states=self.hidden_states)


@dataclass(frozen=True)
class MllamaFamily(Family):
    """Llama 3.2 Vision: exit k cuts the local stack; the global stack and the taps are kept (see module doc)."""

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
        tower = attr_path(model, self.tower)
        vision = tower(
            pixel_values=inputs["pixel_values"].to(tower.dtype), aspect_ratio_ids=inputs["aspect_ratio_ids"],
            aspect_ratio_mask=inputs["aspect_ratio_mask"],
        ).last_hidden_state  # fmt: skip
        projected = attr_path(model, self.projector)(vision)
        return projected.reshape(-1, vision.shape[-2], projected.shape[-1])

    def lm_inputs(self, model, inputs: dict, features: torch.Tensor) -> dict:
        return {
            "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "cross_attention_mask": inputs["cross_attention_mask"], "cross_attention_states": features,
        }  # fmt: skip

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


FAMILIES: tuple[Family, ...] = (
    Family(
        name="LLaVA-1.5", model_types=("llava",), model_class="LlavaForConditionalGeneration",
        tower="model.vision_tower", blocks="encoder", projector="model.multi_modal_projector",
        gguf_projector="mlp", onnx_image_inputs=("pixel_values",),
    ),
    LlavaNextFamily(
        name="LLaVA-NeXT", model_types=("llava_next",), model_class="LlavaNextForConditionalGeneration",
        tower="model.vision_tower", blocks="encoder", projector="model.multi_modal_projector",
        gguf_projector="mlp", onnx_image_inputs=("pixel_values", "image_sizes"),
    ),
    MllamaFamily(
        name="Llama 3.2 Vision", model_types=("mllama",), model_class="MllamaForConditionalGeneration",
        tower="model.vision_model", blocks="transformer", projector="model.multi_modal_projector",
        gguf_projector=None, onnx_image_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"),
    ),
)  # fmt: skip
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_for(config) -> Family:
    """The family of a transformers config, or a UserError listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise UserError(f"unsupported model_type {model_type!r}; supported families: {supported()}")
    return _BY_MODEL_TYPE[model_type]
