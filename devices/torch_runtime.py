"""The PyTorch runtime: transformers' own modelling code with the vision tower exiting at k. The only runtime that
imports torch and transformers; it is the reference the others are compared with, token for token."""

from __future__ import annotations

import time

import torch

from edgekit.devices.runtime import Prompt, Runtime, phases, processor_inputs, until_eos
from edgekit.model.families import eos_ids
from edgekit.model.surgery import set_exit_layer


class TorchRuntime(Runtime):
    """transformers' own code with the vision tower exiting at k (in memory; the model stays cut at k)."""

    name = "pytorch"

    def __init__(self, loaded, exit_layer: int):
        super().__init__(loaded.processor)
        self.loaded, self.exit_layer = loaded, exit_layer
        set_exit_layer(loaded.model, exit_layer)
        self.eos = eos_ids(loaded.model)

    def _inputs(self, prompt: Prompt) -> dict:
        set_exit_layer(self.loaded.model, self.exit_layer)  # another user of the model may have moved the exit
        inputs = processor_inputs(self.processor, prompt)
        return {key: v.to(self.loaded.model.device) if hasattr(v, "to") else v for key, v in inputs.items()}

    def generate(self, prompt: Prompt, max_new_tokens: int = 32) -> list[int]:
        return until_eos(self.greedy(prompt, max_new_tokens)[0].tolist(), self.eos)

    def greedy(self, prompt: Prompt, max_new_tokens: int, **generate_kwargs):
        """transformers' greedy generate at the exit layer, as it returns it; `generate_kwargs` go to it (for the
        per-step scores, say)."""
        model, family, k = self.loaded.model, self.loaded.family, self.exit_layer
        inputs = self._inputs(prompt)
        with torch.no_grad():
            features = family.features_per_layer(model, inputs, [k])[k]
            return family.generate(
                model,
                family.lm_inputs(model, inputs, features),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )

    def timed(self, prompt: Prompt, steps: int) -> dict:
        from transformers import LogitsProcessor, LogitsProcessorList

        model, family, k = self.loaded.model, self.loaded.family, self.exit_layer
        inputs = self._inputs(prompt)
        stamps: list[float] = []

        class Stamp(LogitsProcessor):  # called once per new token, right after the forward that made its logits
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        with torch.no_grad():
            start = time.perf_counter()
            features = family.features_per_layer(model, inputs, [k])[k]
            vision_end = time.perf_counter()
            family.generate(
                model,
                family.lm_inputs(model, inputs, features),
                do_sample=False,
                max_new_tokens=steps + 1,
                min_new_tokens=steps + 1,
                logits_processor=LogitsProcessorList([Stamp()]),
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        return phases(start, vision_end, stamps[0], stamps[-1], len(stamps) - 1)
