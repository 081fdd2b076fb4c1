"""One interface over every runtime an artifact runs in: `runtime.generate(prompt, max_new_tokens) -> list[int]`.

Greedy decoding of one image + one user question; the new token ids, up to and including the first end-of-sequence
token. `runtime.timed(prompt, steps)` decodes a fixed number of tokens with eos ignored and times each phase, so every
runtime does the same work in a benchmark (`edgekit.devices.bench`). The runtimes carry the names of the export's
runtime sets:

| name       | what runs                                                   | built from                          |
|------------|-------------------------------------------------------------|-------------------------------------|
| `pytorch`  | transformers, vision tower exiting at k (`TorchRuntime`)    | a checkpoint + k                    |
| `onnx`     | the three ONNX graphs in ONNX Runtime (`OnnxVLM`)           | an ONNX folder + the processor      |
| `gguf`     | LM GGUF + mmproj GGUF through llama.cpp's mtmd              | the two GGUF files + the processor  |
| `hybrid`   | ONNX vision graph -> image embeddings -> llama.cpp LM GGUF  | ONNX folder + LM GGUF + processor   |
| `ortgenai` | the ONNX folder in onnxruntime-genai's own generate loop    | ONNX folder with its genai files    |
|            | (`OrtGenaiRuntime`)                                         | + the processor                     |

The processor (chat template, tokenizer, image preprocessing) is built from the export's `processor/` folder by
`edgekit.devices.processor.DeviceProcessor` (numpy, tokenizers, jinja2, Pillow: what transformers' processor does,
without torch or transformers), so `open_runtime(kind, folder)` needs the artifact folder alone; `pytorch` keeps the
model's own HF processor. `gguf` is the odd one out: llama.cpp tokenizes the text and preprocesses the image itself
(its prompt is the same chat-templated text with mtmd's marker where the image goes), so its tokens can differ from
the others' even before the known CLS-ordering bug.
This module imports neither torch nor the runtimes' libraries; each runtime imports its own when it is built. The
runtimes take either processor (the HF one gives the reference inputs in tests).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIMES = ("pytorch", "onnx", "gguf", "hybrid", "ortgenai")
# What each runtime loads, named as the export manifest's artifacts (pytorch: a checkpoint folder).
FILES = {
    "pytorch": ("checkpoint",),
    "onnx": ("processor_dir", "onnx_dir"),
    "gguf": ("processor_dir", "lm_gguf", "mmproj_gguf"),
    "hybrid": ("processor_dir", "onnx_dir", "lm_gguf"),
    "ortgenai": ("processor_dir", "genai_dir"),
}


@dataclass(frozen=True)
class Prompt:
    """One image and one user question (the chat template is applied by the runtime)."""

    image: Any  # PIL.Image.Image
    text: str


def chat_text(processor, question: str) -> str:
    """One user turn, an image then `question`, through the model's chat template, ready for the answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def processor_inputs(processor, prompt: Prompt, return_tensors: str = "pt") -> dict:
    """What the processor makes of the prompt: torch tensors for PyTorch, numpy arrays ("np") for the others."""
    return dict(processor(images=prompt.image, text=chat_text(processor, prompt.text), return_tensors=return_tensors))


def until_eos(tokens, eos: Sequence[int]) -> list[int]:
    out = []
    for token in tokens:
        out.append(int(token))
        if int(token) in eos:
            break
    return out


def phases(start: float, vision_end: float, first_token: float, end: float, steps: int) -> dict:
    """Seconds of one timed run: vision encode, LM prefill up to the first token's logits, then `steps` decodes."""
    return {
        "vision_s": vision_end - start,
        "prefill_s": first_token - vision_end,
        "decode_s": end - first_token,
        "steps": steps,
    }


class Runtime(ABC):
    name: str

    def __init__(self, processor):
        self.processor = processor

    def inputs(self, prompt: Prompt) -> dict:
        """The prompt as numpy arrays, as ONNX Runtime and the hybrid consume it."""
        return processor_inputs(self.processor, prompt, "np")

    @abstractmethod
    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        """Greedy new tokens, up to and including the first end-of-sequence token."""

    @abstractmethod
    def timed(self, prompt: Prompt, steps: int) -> dict:
        """Greedy decoding of the first token and `steps` more, eos ignored; `phases` of the run."""

    def decode(self, tokens: Sequence[int]) -> str:
        return self.processor.tokenizer.decode(list(tokens), skip_special_tokens=True)


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(
        self, onnx_folder, processor, providers: Sequence[str] = ("CPUExecutionProvider",), new_session_options=None
    ):
        from edgekit.devices.onnx_runtime import OnnxVLM

        super().__init__(processor)
        self.vlm = OnnxVLM(onnx_folder, providers, new_session_options)
        self.vlm.vision, self.vlm.embed, self.vlm.decoder  # noqa: B018  open every session now: loading is loading
        self.eos = list(self.vlm.config["eos_token_ids"])

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        return until_eos(self.vlm.generate(self.inputs(prompt), max_new_tokens)[0], self.eos)

    def timed(self, prompt: Prompt, steps: int) -> dict:
        inputs = self.inputs(prompt)
        start = time.perf_counter()
        features = self.vlm.image_features(inputs)
        vision_end = time.perf_counter()
        stamps: list[float] = []  # one per decoder run: the prefill, then each step
        self.vlm.generate(inputs, steps + 1, eos_token_ids=(), features=features, stamps=stamps)
        return phases(start, vision_end, stamps[0], stamps[-1], len(stamps) - 1)


class LlamaCppRuntime(Runtime):
    """llama.cpp end to end (mtmd): what `llama-mtmd-cli --mmproj` runs on a device."""

    name = "gguf"

    def __init__(self, lm_gguf, mmproj_gguf, processor, **options):
        from edgekit.devices.llama_runtime import MtmdVLM

        super().__init__(processor)
        self.vlm = MtmdVLM(lm_gguf, mmproj_gguf, **options)

    def prompt_text(self, prompt: Prompt) -> str:
        """The chat-templated prompt with mtmd's marker in place of the processor's image token."""
        token = getattr(self.processor, "image_token", None) or "<image>"
        text = chat_text(self.processor, prompt.text)
        if text.count(token) != 1:
            raise ValueError(f"the chat template put {text.count(token)} {token!r} in the prompt; expected one")
        return text.replace(token, self.vlm.marker)

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        return self.vlm.generate(prompt.image, self.prompt_text(prompt), max_new_tokens)

    def timed(self, prompt: Prompt, steps: int) -> dict:
        text = self.prompt_text(prompt)
        start = time.perf_counter()
        logits, pos = self.vlm.prefill(prompt.image, text)  # mtmd encodes the image inside its prefill
        first_token = time.perf_counter()
        self.vlm.decoder.decode_steps(logits, pos, steps)
        return phases(start, start, first_token, time.perf_counter(), steps)


class HybridRuntime(Runtime):
    """ONNX Runtime vision graph + llama.cpp language model; sidesteps llama.cpp's LLaVA CLS-ordering bug."""

    name = "hybrid"

    def __init__(self, onnx_folder, lm_gguf, processor, **options):
        from edgekit.devices.llama_runtime import HybridVLM

        super().__init__(processor)
        self.vlm = HybridVLM(onnx_folder, lm_gguf, **options)
        self.vlm.vision.vision  # noqa: B018  open the vision session now

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        return self.vlm.generate(self.inputs(prompt), max_new_tokens)

    def timed(self, prompt: Prompt, steps: int) -> dict:
        inputs = self.inputs(prompt)
        start = time.perf_counter()
        features = self.vlm.vision.image_features(inputs)
        vision_end = time.perf_counter()
        logits, pos = self.vlm.prefill(inputs, features)
        first_token = time.perf_counter()
        self.vlm.decoder.decode_steps(logits, pos, steps)
        return phases(start, vision_end, first_token, time.perf_counter(), steps)


def export_files(kind: str, folder) -> dict[str, Path]:
    """The files runtime `kind` loads from an `edgekit export` folder, by its manifest (pytorch: the folder is a
    checkpoint)."""
    from edgekit.errors import UserError
    from edgekit.export.manifest import MANIFEST_FILE

    folder = Path(folder)
    if kind not in FILES:
        raise UserError(f"unknown runtime {kind!r}; choose one of {', '.join(RUNTIMES)}")
    if kind == "pytorch":
        return {"checkpoint": folder}
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{folder}: no {MANIFEST_FILE} (not an edgekit export folder)")
    manifest = json.loads(manifest_path.read_text())
    art: dict[str, Any] = manifest["artifacts"]
    why = manifest.get("unsupported_runtimes", {}).get(kind)
    if why:
        raise UserError(f"{folder} has no {kind} runtime: {why}")
    missing = [key for key in FILES[kind] if not art.get(key)]
    if missing:
        raise UserError(f"{folder} has no {', '.join(missing)} for the {kind} runtime")
    return {key: folder / art[key] for key in FILES[kind]}


def open_processor(folder):
    """The device processor over an export's `processor/` folder. A family it does not handle yet (LLaVA-NeXT, Mllama)
    gets transformers' processor where transformers is installed (the build machine, so their builds still gate);
    on a device without it, the device processor's one-line refusal stands."""
    from edgekit.devices.processor import DeviceProcessor
    from edgekit.errors import UserError

    try:
        return DeviceProcessor(folder)
    except UserError as refusal:
        try:
            from transformers import AutoProcessor
        except ImportError:
            raise refusal from None
        return AutoProcessor.from_pretrained(folder)


def open_files(kind: str, files: Mapping[str, Any], **options) -> Runtime:
    """Runtime `kind` over its FILES; `options` go to its constructor (pytorch: `exit_layer`, required)."""
    if kind == "pytorch":
        from edgekit.devices.torch_runtime import TorchRuntime
        from edgekit.model.loading import load

        return TorchRuntime(load(files["checkpoint"], dtype=options.pop("dtype", "float32")), **options)
    processor = open_processor(files["processor_dir"])
    if kind == "onnx":
        return OnnxRuntime(files["onnx_dir"], processor, **options)
    if kind == "gguf":
        return LlamaCppRuntime(files["lm_gguf"], files["mmproj_gguf"], processor, **options)
    if kind == "ortgenai":
        from edgekit.devices.genai_runtime import OrtGenaiRuntime

        return OrtGenaiRuntime(files["genai_dir"], processor, **options)
    return HybridRuntime(files["onnx_dir"], files["lm_gguf"], processor, **options)


def open_runtime(kind: str, folder, **options) -> Runtime:
    """Runtime `kind` (one of RUNTIMES) over an `edgekit export` folder, or over a checkpoint for `pytorch`."""
    return open_files(kind, export_files(kind, folder), **options)
