"""The device's own processor: what transformers' LLaVA-1.5 processor does, from the export's `processor/` folder,
with numpy, tokenizers, jinja2 and Pillow only (no torch, no transformers).

- Chat template: rendered with jinja2 as transformers renders it (sandboxed, trim_blocks + lstrip_blocks,
  loopcontrols, the same globals and `tojson`, the tokenizer's special tokens as variables).
- Text: `tokenizers.Tokenizer` over tokenizer.json. The folder is written by transformers' `save_pretrained`, so
  tokenizer.json already holds the post-processor (bos) transformers would apply; each image token is expanded first,
  to (crop / patch_size)^2 + num_additional_image_tokens, minus one for the "default" feature strategy (CLS dropped).
- Image: transformers' Pillow backend for CLIPImageProcessor, step for step: RGB (alpha composited onto white),
  shortest edge resized with Pillow's own filter, centre crop (zero-padded when too small), rescale in float64 then
  float32, normalize in float32, CHW. Pillow is the resize itself: its bicubic filter, in its integer arithmetic, is
  what the reference runs, so a numpy resize could not match it bit for bit; Pillow also decodes the image files.

The family facts come from the folder (processor_config.json: processor class, patch size, additional tokens, feature
strategy, image token), not from `edgekit.model.families`, which imports torch. Only LLaVA-1.5's processor
(`LlavaProcessor` with a CLIP image processor) is handled; others are refused in one line (see README).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UserError

SUPPORTED_PROCESSOR = "LlavaProcessor"
CLIP_IMAGE_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' special_tokens_map keys
# transformers' clean_up_tokenization, for tokenizers saved with clean_up_tokenization_spaces=True.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"))
_CLEAN_UP += ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, processor_config: Mapping, tokenizer_config: Mapping) -> str:
    """Where transformers looks, in its order: the processor's template file, its JSON, then the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for source in (_read_json(folder / "chat_template.json"), processor_config, tokenizer_config):
        if source.get("chat_template"):
            return source["chat_template"]
    raise UserError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or a config's)")


def compile_template(source: str):
    """The template in the environment transformers renders chat templates in."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f)}
    return env.from_string(source)


class DeviceTokenizer:
    """tokenizer.json through `tokenizers`, with the decode transformers' tokenizer gives (`Runtime.decode`)."""

    def __init__(self, folder: Path, tokenizer_config: Mapping):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.clean_up = bool(tokenizer_config.get("clean_up_tokenization_spaces", False))
        self.special = {key: _token_text(tokenizer_config.get(key)) for key in SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        for old, new in _CLEAN_UP if self.clean_up else ():
            text = text.replace(old, new)
        return text


class ClipImages:
    """CLIPImageProcessor's Pillow path over its saved settings: one PIL image -> [3, H, W] float32."""

    def __init__(self, config: Mapping):
        kind = config.get("image_processor_type")
        if kind not in CLIP_IMAGE_PROCESSORS:
            raise UserError(
                f"image processor {kind!r}: the device processor handles {', '.join(CLIP_IMAGE_PROCESSORS)}"
            )
        self.config = dict(config)
        self.mean = np.asarray(config["image_mean"], np.float32)
        self.std = np.asarray(config["image_std"], np.float32)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: the shortest edge to `size`, or the fixed height and width."""
        size = self.config["size"]
        if "shortest_edge" not in size:
            return size["width"], size["height"]
        short, long = sorted((width, height))
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, image) -> np.ndarray:
        c = self.config
        if c.get("do_convert_rgb", True):
            image = _rgb(image)
        if c.get("do_resize", True):
            image = image.resize(self.resized_size(*image.size), resample=c.get("resample", 3))
        pixels = np.asarray(image)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        if c.get("do_center_crop", True):
            pixels = center_crop(pixels, c["crop_size"]["height"], c["crop_size"]["width"])
        if c.get("do_rescale", True):
            pixels = (pixels.astype(np.float64) * c["rescale_factor"]).astype(np.float32)
        if c.get("do_normalize", True):
            pixels = (pixels.astype(np.float32) - self.mean) / self.std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def _rgb(image):
    """RGB, transparency composited onto white (transformers' convert_to_rgb)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] cropped about the centre; zero-padded (centred) first where the image is smaller."""
    h, w = pixels.shape[:2]
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if pad_h or pad_w:
        top, left = -(-pad_h // 2), -(-pad_w // 2)  # ceil, as transformers pads
        padded = np.zeros((h + pad_h, w + pad_w, pixels.shape[2]), pixels.dtype)
        padded[top : top + h, left : left + w] = pixels
        pixels, h, w = padded, h + pad_h, w + pad_w
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


class DeviceProcessor:
    """LLaVA-1.5's processor from its saved folder; called as transformers' processor is (`return_tensors="np"`)."""

    def __init__(self, folder):
        folder = Path(folder)
        config = _read_json(folder / "processor_config.json")
        kind = config.get("processor_class")
        if kind != SUPPORTED_PROCESSOR:
            raise UserError(
                f"{folder}: processor {kind!r}; the device runtime's processor handles LLaVA-1.5 "
                f"({SUPPORTED_PROCESSOR}) only: LLaVA-NeXT anyres tiling and Mllama tiles are not ported (see README)"
            )
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        self.images = ClipImages(config.get("image_processor") or _read_json(folder / "preprocessor_config.json"))
        self.tokenizer = DeviceTokenizer(folder, tokenizer_config)
        self.template = compile_template(_chat_template(folder, config, tokenizer_config))
        self.image_token = config.get("image_token", "<image>")
        self.patch_size = int(config["patch_size"])
        self.num_additional_image_tokens = int(config.get("num_additional_image_tokens", 0))
        self.vision_feature_select_strategy = config.get("vision_feature_select_strategy")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        # The variables transformers passes: tools and documents (None here) and the tokenizer's special tokens.
        variables = {"tools": None, "documents": None, **self.tokenizer.special}
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def num_image_tokens(self, pixels: np.ndarray) -> int:
        height, width = pixels.shape[-2:]
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    def __call__(self, images, text: str, return_tensors: str = "np") -> dict[str, np.ndarray]:
        """input_ids, attention_mask [1, n] int64 and pixel_values [images, 3, H, W] float32 for one prompt."""
        if return_tensors != "np":
            raise ValueError(f"the device processor returns numpy arrays (return_tensors='np'), not {return_tensors!r}")
        images = list(images) if isinstance(images, list | tuple) else [images]
        if text.count(self.image_token) != len(images):
            raise ValueError(
                f"{text.count(self.image_token)} {self.image_token!r} in the text for {len(images)} images"
            )
        pixels = np.stack([self.images(image) for image in images])
        parts = text.split(self.image_token)
        expanded = parts[0] + "".join(
            self.image_token * self.num_image_tokens(p) + rest for p, rest in zip(pixels, parts[1:])
        )
        ids = np.asarray([self.tokenizer.encode(expanded)], np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels}
