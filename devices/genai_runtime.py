"""The `ortgenai` runtime: an ONNX folder with its onnxruntime-genai files (`edgekit.export.genai`) run by
onnxruntime-genai's own generate loop, the one an app embeds through its C, Java or C# API.

onnxruntime-genai has no LLaVA prompt processor, so the host does what the app would: the device processor
(`edgekit.devices.processor`) makes `input_ids` (image token expanded) and `pixel_values`, and `Generator.set_inputs`
takes them with `num_image_tokens`, which sizes the vision graph's output. Vision, merge, prefill and decoding all
run inside onnxruntime-genai. numpy, onnxruntime-genai and the device processor only: no torch, no transformers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgekit.devices.onnx_runtime import room_for_float32
from edgekit.devices.runtime import Prompt, Runtime, phases, until_eos
from edgekit.export.onnx_format import DECODER_FILE, DESCRIPTION_FILE, GENAI_CONFIG_FILE, Names, float16_graphs


class OrtGenaiRuntime(Runtime):
    name = "ortgenai"

    def __init__(self, onnx_folder, processor, n_threads: int | None = None):
        import onnxruntime_genai as og

        super().__init__(processor)
        folder = Path(onnx_folder)
        if not (folder / GENAI_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {GENAI_CONFIG_FILE}: export it with onnxruntime-genai files")
        desc = json.loads((folder / DESCRIPTION_FILE).read_text())
        self.image_token_id, self.eos = desc["image_token_id"], list(desc["eos_token_ids"])
        config = og.Config(str(folder))
        config.clear_providers()  # CPU
        options = {}  # the vision and embedding sessions take the decoder's
        if n_threads:
            options |= {"intra_op_num_threads": n_threads, "inter_op_num_threads": 1}
        if DECODER_FILE in float16_graphs(desc) and not room_for_float32(folder, DECODER_FILE):  # every session's
            # float16 weights cast per use, not folded into a float32 copy (edgekit.devices.onnx_runtime)
            options |= {"graph_optimization_level": "ORT_DISABLE_ALL", "enable_cpu_mem_arena": False}
        if options:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og, self.model = og, og.Model(config)

    def _generator(self, prompt: Prompt, new_tokens: int, ignore_eos: bool = False):
        """A generator over the prompt, not yet run; its prompt length."""
        inputs = self.inputs(prompt)
        input_ids = np.asarray(inputs[Names.INPUT_IDS], dtype=np.int32)
        named = self.og.NamedTensors()
        named[Names.INPUT_IDS] = input_ids
        named[Names.PIXEL_VALUES] = np.asarray(inputs[Names.PIXEL_VALUES], dtype=np.float32)
        named[Names.NUM_IMAGE_TOKENS] = np.array([int((input_ids == self.image_token_id).sum())], dtype=np.int64)
        total = input_ids.shape[1] + new_tokens
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total if ignore_eos else 0)
        return self.og.Generator(self.model, params), named

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        generator, named = self._generator(prompt, max_new_tokens)
        generator.set_inputs(named)  # vision, merge and prefill
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return until_eos(tokens, self.eos)

    def timed(self, prompt: Prompt, steps: int) -> dict:
        generator, named = self._generator(prompt, steps + 1, ignore_eos=True)
        start = time.perf_counter()
        generator.set_inputs(named)  # the vision graph runs inside the prefill, so its time counts there
        first_token = time.perf_counter()
        for _ in range(steps + 1):  # the first picks from the prefill's logits; each further one runs the decoder
            generator.generate_next_token()
        return phases(start, start, first_token, time.perf_counter(), steps)
