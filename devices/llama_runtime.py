"""llama.cpp runtimes (llama-cpp-python's low-level bindings): greedy decoding over a language-model GGUF, fed either
by llama.cpp's own vision path (mtmd + an mmproj GGUF) or by image embeddings computed elsewhere (the hybrid).

- `LlamaDecoder`: the LM GGUF in a llama.cpp context; decodes token batches and embedding batches
  (`llama_batch_init(n, n_embd, 1)` + `llama_decode`) at explicit positions, and decodes greedily.
- `MtmdVLM`: image + prompt text through mtmd (`mtmd_tokenize`, `mtmd_helper_eval_chunks`), as llama.cpp's own
  `llama-mtmd-cli` and llama-cpp-python's MTMDChatHandler do. mtmd tokenizes the text and preprocesses the image
  itself (LLaVA-1.5: pads to a square instead of centre-cropping), and its LLaVA graph puts CLS after the patches
  (ggml-org/llama.cpp#25814), so its image embeddings differ from transformers': measure it, never assume parity.
- `HybridVLM`: the ONNX vision graph (`edgekit.devices.onnx_runtime.OnnxVLM`) computes the image features exactly as
  transformers does; they go to llama.cpp's decoder as embeddings at the image-token positions, and the prompt's
  other tokens (from the processor) as ordinary tokens. This sidesteps the upstream CLS-ordering bug.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _quiet():
    from llama_cpp._utils import suppress_stdout_stderr

    return suppress_stdout_stderr(disable=False)  # llama.cpp / mtmd log to the C-level stderr


class LlamaDecoder:
    """A language-model GGUF in a llama.cpp context, driven batch by batch at explicit positions (sequence 0)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
    ):
        import llama_cpp

        self._lib = llama_cpp
        n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        with _quiet():
            self.llama = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers,
                verbose=False,
            )
        self.ctx = self.llama._ctx.ctx
        self.n_batch, self.n_ctx = n_batch, n_ctx
        self.n_embd = llama_cpp.llama_model_n_embd(self.llama.model)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def reset(self) -> None:
        """Forget every position (the KV cache) before a new prompt."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)

    def is_eog(self, token: int) -> bool:
        """End of generation as the GGUF's vocabulary says (eos, eot, ...)."""
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def _check_room(self, pos: int, n: int) -> None:
        if pos + n > self.n_ctx:
            raise ValueError(f"prompt and answer need {pos + n} positions; the context holds {self.n_ctx}")

    def decode_tokens(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        """Decode `tokens` at positions pos.. ; the logits [n_vocab] of the last one."""
        self._check_room(pos, len(tokens))
        for start in range(0, len(tokens), self.n_batch):
            chunk = [int(t) for t in tokens[start : start + self.n_batch]]
            batch = self._lib.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, token in enumerate(chunk):
                    batch.token[i] = token
                self._fill(batch, len(chunk), pos + start, last=start + len(chunk) == len(tokens))
                self._decode(batch)
            finally:
                self._lib.llama_batch_free(batch)
        return self.last_logits()

    def decode_embeddings(self, embeddings: np.ndarray, pos: int) -> np.ndarray:
        """Decode rows of input embeddings [n, n_embd] (image features) at positions pos.. ; logits of the last."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.n_embd:
            raise ValueError(f"embeddings of shape {embeddings.shape}; the model takes [n, {self.n_embd}]")
        n = embeddings.shape[0]
        self._check_room(pos, n)
        for start in range(0, n, self.n_batch):
            chunk = embeddings[start : start + self.n_batch]
            batch = self._lib.llama_batch_init(len(chunk), self.n_embd, 1)
            try:
                ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                self._fill(batch, len(chunk), pos + start, last=start + len(chunk) == n)
                self._decode(batch)
            finally:
                self._lib.llama_batch_free(batch)
        return self.last_logits()

    @staticmethod
    def _fill(batch, n: int, pos: int, last: bool) -> None:
        batch.n_tokens = n
        for i in range(n):
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = last and i == n - 1

    def _decode(self, batch) -> None:
        rc = self._lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def greedy(self, logits: np.ndarray, pos: int, max_new_tokens: int, eos: Sequence[int] = ()) -> list[int]:
        """Greedy tokens from the prompt's last logits; stops after the first end-of-generation token (kept)."""
        out: list[int] = []
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if token in eos or self.is_eog(token) or step == max_new_tokens - 1:
                break
            logits = self.decode_tokens([token], pos)
            pos += 1
        return out

    def decode_steps(self, logits: np.ndarray, pos: int, steps: int) -> None:
        """Decode `steps` greedy tokens after the one `logits` picks, end of generation ignored (a benchmark's
        fixed amount of work)."""
        for _ in range(steps):
            logits = self.decode_tokens([int(np.argmax(logits))], pos)
            pos += 1

    def close(self) -> None:
        self.llama.close()


class HybridVLM:
    """Vision graph in ONNX Runtime, language model in llama.cpp; `generate` takes processor-built inputs."""

    def __init__(
        self, onnx_folder: str | os.PathLike, lm_gguf: str | os.PathLike, new_session_options=None, **decoder_options
    ):
        from edgekit.devices.onnx_runtime import OnnxVLM

        self.vision = OnnxVLM(onnx_folder, new_session_options=new_session_options)
        if self.vision.cross:
            raise ValueError("the hybrid runtime feeds image tokens; Llama 3.2 Vision's cross-attention has none")
        self.image_token_id = int(self.vision.config["image_token_id"])
        self.decoder = LlamaDecoder(lm_gguf, **decoder_options)

    def prefill(self, inputs: Mapping, features: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Decode the prompt: runs of text tokens as tokens, runs of image tokens as the image features, in order.
        Returns the last logits and the next position."""
        from edgekit.devices.onnx_runtime import _np

        ids = _np(inputs["input_ids"])
        if ids.shape[0] != 1:
            raise ValueError(f"one prompt at a time, got a batch of {ids.shape[0]}")
        ids = ids[0].tolist()
        features = self.vision.image_features(inputs) if features is None else np.asarray(features)
        n_image = sum(t == self.image_token_id for t in ids)
        if n_image != features.shape[0]:
            raise ValueError(f"{n_image} image tokens in the prompt, {features.shape[0]} image features")
        self.decoder.reset()
        pos, used, logits = 0, 0, None
        while pos < len(ids):
            is_image = ids[pos] == self.image_token_id
            end = pos
            while end < len(ids) and (ids[end] == self.image_token_id) == is_image:
                end += 1
            if is_image:
                logits = self.decoder.decode_embeddings(features[used : used + end - pos], pos)
                used += end - pos
            else:
                logits = self.decoder.decode_tokens(ids[pos:end], pos)
            pos = end
        assert logits is not None
        return logits, pos

    def generate(self, inputs: Mapping, max_new_tokens: int = 32, eos_token_ids: Sequence[int] = ()) -> list[int]:
        logits, pos = self.prefill(inputs)
        eos = list(eos_token_ids) or list(self.vision.config["eos_token_ids"])
        return self.decoder.greedy(logits, pos, max_new_tokens, eos)


class MtmdVLM:
    """llama.cpp's own multimodal path: LM GGUF + mmproj GGUF through mtmd; takes the raw image and prompt text."""

    def __init__(
        self,
        lm_gguf: str | os.PathLike,
        mmproj_gguf: str | os.PathLike,
        *,
        n_threads: int | None = None,
        use_gpu: bool = False,
        **decoder_options,
    ):
        from llama_cpp import mtmd_cpp

        self._mtmd = mtmd_cpp
        self.decoder = LlamaDecoder(lm_gguf, n_threads=n_threads, **decoder_options)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.print_timings = use_gpu, False
        params.n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        with _quiet():
            self.ctx = mtmd_cpp.mtmd_init_from_file(os.fsencode(Path(mmproj_gguf)), self.decoder.llama.model, params)
        if not self.ctx:
            raise RuntimeError(f"mtmd could not load {mmproj_gguf}")
        self.marker = mtmd_cpp.mtmd_default_marker().decode()

    def _chunks(self, image, text: str):
        """mtmd_tokenize `text` (one marker per image) with the image; the caller frees the chunks."""
        mtmd = self._mtmd
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        h, w, _ = pixels.shape
        bitmap = mtmd.mtmd_bitmap_init(w, h, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        encoded = text.encode()
        text_in = mtmd.mtmd_input_text()
        text_in.text, text_in.text_len, text_in.add_special, text_in.parse_special = encoded, len(encoded), True, True
        try:
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            with _quiet():  # mtmd logs each text and media part to the C-level stdout
                rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text_in), bitmaps, 1)
            if rc != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise ValueError(f"mtmd_tokenize failed with code {rc} (is there exactly one {self.marker}?)")
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def prompt_tokens(self, image, text: str) -> list[int | None]:
        """The prompt as mtmd lays it out: text token ids, None for each image position."""
        mtmd = self._mtmd
        chunks = self._chunks(image, text)
        out: list[int | None] = []
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    out += [int(ptr[j]) for j in range(n.value)]
                else:
                    out += [None] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return out

    def image_embeddings(self, image) -> np.ndarray:
        """What mtmd feeds the LM for `image` alone: [image tokens, n_embd]."""
        mtmd = self._mtmd
        chunks = self._chunks(image, self.marker)
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    with _quiet():
                        rc = mtmd.mtmd_encode_chunk(self.ctx, chunk)
                    if rc != 0:
                        raise RuntimeError("mtmd_encode_chunk failed")
                    out = mtmd.mtmd_get_output_embd(self.ctx)
                    return np.ctypeslib.as_array(out, shape=(n * self.decoder.n_embd,)).reshape(n, -1).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        raise ValueError("no image chunk")

    def prefill(self, image, text: str) -> tuple[np.ndarray, int]:
        """Decode a prompt `text` holding one `self.marker` where the image goes; the last logits and the next
        position."""
        from llama_cpp import llama_pos

        mtmd = self._mtmd
        chunks = self._chunks(image, text)
        self.decoder.reset()
        try:
            new_pos = llama_pos(0)
            with _quiet():
                rc = mtmd.mtmd_helper_eval_chunks(
                    self.ctx, self.decoder.ctx, chunks, 0, 0, self.decoder.n_batch, True, ctypes.byref(new_pos)
                )
            if rc != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunks failed with code {rc}")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return self.decoder.last_logits(), new_pos.value

    def generate(self, image, text: str, max_new_tokens: int = 32, eos_token_ids: Sequence[int] = ()) -> list[int]:
        """Greedy tokens for a prompt `text` holding one `self.marker` where the image goes."""
        logits, pos = self.prefill(image, text)
        return self.decoder.greedy(logits, pos, max_new_tokens, eos_token_ids)

    def close(self) -> None:
        if self.ctx:
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.decoder.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
