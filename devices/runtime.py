"""One interface over every runtime an artifact runs in: `runtime.generate(prompt, max_new_tokens) -> list[int]`.

Greedy decoding of one image + one user question; the new token ids, up to and including the first end-of-sequence
token. Runtimes:

| name       | what runs                                                   | built from                          |
|------------|-------------------------------------------------------------|-------------------------------------|
| `pytorch`  | transformers, vision tower exiting at k (`family.generate`) | a LoadedModel + k                   |
| `onnx`     | the three ONNX graphs in ONNX Runtime (`OnnxVLM`)           | an ONNX folder + the processor      |
| `llama`    | LM GGUF + mmproj GGUF through llama.cpp's mtmd              | the two GGUF files + the processor  |
| `hybrid`   | ONNX vision graph -> image embeddings -> llama.cpp LM GGUF  | ONNX folder + LM GGUF + processor   |

The processor (chat template, tokenizer, image preprocessing) is the model's own HF processor; an export folder ships
it in `processor/`, so `open_runtime(kind, folder)` needs nothing else. `llama` is the odd one out: llama.cpp
tokenizes the text and preprocesses the image itself (its prompt is the same chat-templated text with mtmd's marker
where the image goes), so its tokens can differ from the others' even before the known CLS-ordering bug.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIMES = ("pytorch", "onnx", "llama", "hybrid")


@dataclass(frozen=True)
class Prompt:
    """One image and one user question (the chat template is applied by the runtime)."""

    image: Any  # PIL.Image.Image
    text: str


def chat_text(processor, prompt: Prompt) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def processor_inputs(processor, prompt: Prompt) -> dict:
    """What the HF processor makes of the prompt (tensors), as PyTorch, ONNX and hybrid consume it."""
    return dict(processor(images=prompt.image, text=chat_text(processor, prompt), return_tensors="pt"))


def until_eos(tokens, eos: Sequence[int]) -> list[int]:
    out = []
    for token in tokens:
        out.append(int(token))
        if int(token) in eos:
            break
    return out


class Runtime(ABC):
    name: str

    def __init__(self, processor):
        self.processor = processor

    @abstractmethod
    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        """Greedy new tokens, up to and including the first end-of-sequence token."""

    def decode(self, tokens: Sequence[int]) -> str:
        return self.processor.tokenizer.decode(list(tokens), skip_special_tokens=True)


class TorchRuntime(Runtime):
    """transformers' own code with the vision tower exiting at k (in memory; the model stays cut at k)."""

    name = "pytorch"

    def __init__(self, loaded, exit_layer: int):
        from edgekit.model.surgery import set_exit_layer

        super().__init__(loaded.processor)
        self.loaded, self.exit_layer = loaded, exit_layer
        set_exit_layer(loaded.model, exit_layer)
        eos = loaded.model.generation_config.eos_token_id
        self.eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        import torch

        from edgekit.model.surgery import set_exit_layer

        model, family, k = self.loaded.model, self.loaded.family, self.exit_layer
        set_exit_layer(model, k)  # another user of the model may have moved the exit
        inputs = processor_inputs(self.processor, prompt)
        inputs = {key: v.to(model.device) if hasattr(v, "to") else v for key, v in inputs.items()}
        with torch.no_grad():
            features = family.features_per_layer(model, inputs, [k])[k]
            out = family.generate(model, family.lm_inputs(model, inputs, features), do_sample=False,
                                  max_new_tokens=max_new_tokens)  # fmt: skip
        return until_eos(out[0].tolist(), self.eos)


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, onnx_folder, processor, providers: Sequence[str] = ("CPUExecutionProvider",)):
        from edgekit.devices.onnx_runtime import OnnxVLM

        super().__init__(processor)
        self.vlm = OnnxVLM(onnx_folder, providers=providers)
        self.eos = list(self.vlm.config["eos_token_ids"])

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        return until_eos(self.vlm.generate(processor_inputs(self.processor, prompt), max_new_tokens)[0], self.eos)


class LlamaCppRuntime(Runtime):
    """llama.cpp end to end (mtmd): what `llama-mtmd-cli --mmproj` runs on a device."""

    name = "llama"

    def __init__(self, lm_gguf, mmproj_gguf, processor, **options):
        from edgekit.devices.llama_runtime import MtmdVLM

        super().__init__(processor)
        self.vlm = MtmdVLM(lm_gguf, mmproj_gguf, **options)

    def prompt_text(self, prompt: Prompt) -> str:
        """The chat-templated prompt with mtmd's marker in place of the processor's image token."""
        token = getattr(self.processor, "image_token", None) or "<image>"
        text = chat_text(self.processor, prompt)
        if text.count(token) != 1:
            raise ValueError(f"the chat template put {text.count(token)} {token!r} in the prompt; expected one")
        return text.replace(token, self.vlm.marker)

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        return self.vlm.generate(prompt.image, self.prompt_text(prompt), max_new_tokens)


class HybridRuntime(Runtime):
    """ONNX Runtime vision graph + llama.cpp language model; sidesteps llama.cpp's LLaVA CLS-ordering bug."""

    name = "hybrid"

    def __init__(self, onnx_folder, lm_gguf, processor, **options):
        from edgekit.devices.llama_runtime import HybridVLM

        super().__init__(processor)
        self.vlm = HybridVLM(onnx_folder, lm_gguf, **options)

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        return self.vlm.generate(processor_inputs(self.processor, prompt), max_new_tokens)


def open_runtime(kind: str, export_dir, **options) -> Runtime:
    """A runtime over an `edgekit export` folder (`onnx`, `llama` or `hybrid`), from its manifest."""
    from transformers import AutoProcessor

    from edgekit.errors import UserError

    folder = Path(export_dir)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{folder}: no manifest.json (not an edgekit export folder)")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    art = manifest["artifacts"]
    processor = AutoProcessor.from_pretrained(folder / art["processor_dir"])
    need = {"onnx": ("onnx_dir",), "llama": ("lm_gguf", "mmproj_gguf"), "hybrid": ("onnx_dir", "lm_gguf")}
    if kind not in need:
        raise UserError(f"unknown runtime {kind!r} for an export folder; choose one of {', '.join(need)}")
    missing = [key for key in need[kind] if not art.get(key)]
    if missing:
        raise UserError(f"{folder} has no {', '.join(missing)} for the {kind} runtime")
    path = {key: folder / art[key] for key in need[kind]}
    if kind == "onnx":
        return OnnxRuntime(path["onnx_dir"], processor, **options)
    if kind == "llama":
        return LlamaCppRuntime(path["lm_gguf"], path["mmproj_gguf"], processor, **options)
    return HybridRuntime(path["onnx_dir"], path["lm_gguf"], processor, **options)
