"""GGUF writers for LLaVA-style models: the Llama language model and the clip.cpp `mmproj` (vision tower + projector).

Keys and tensor names come from the `gguf` package's constants; the few that clip.cpp reads but gguf's PyPI release does
not name yet are defined once below with the llama.cpp header they come from.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR, TokenType
from gguf import GGMLQuantizationType as QType
from tqdm import tqdm

from edgekit.errors import UserError
from edgekit.export.quantizations import LLAMA_CPP_QTYPES
from edgekit.model.families import head_dim
from edgekit.model.weights import ModelTensors

FTYPES = {  # ftype name -> (type for 2-D weights, general.file_type)
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# clip-impl.h KEY_FEATURE_LAYERS; named in gguf-py after the 0.19 PyPI release.
CLIP_VISION_FEATURE_LAYER = getattr(gguf.Keys.ClipVision, "FEATURE_LAYERS", "clip.vision.feature_layer")
CLIP_PROJECTOR_MLP = gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP]

# HF tokenizer.json pre-tokenizer split regexes -> llama.cpp `tokenizer.ggml.pre` names (llama-vocab.cpp).
BPE_PRE_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",  # Llama 3
}

# CLIP vision transformer (HF names relative to the tower) -> clip.cpp tensors.
CLIP_EMBEDDINGS = {
    "embeddings.class_embedding": MODEL_TENSOR.V_ENC_EMBD_CLS,
    "embeddings.patch_embedding": MODEL_TENSOR.V_ENC_EMBD_PATCH,
    "embeddings.position_embedding": MODEL_TENSOR.V_ENC_EMBD_POS,
    "pre_layrnorm": MODEL_TENSOR.V_PRE_NORM,
}
CLIP_BLOCK = {
    "self_attn.q_proj": MODEL_TENSOR.V_ENC_ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.V_ENC_ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.V_ENC_ATTN_V,
    "self_attn.out_proj": MODEL_TENSOR.V_ENC_ATTN_O,
    "layer_norm1": MODEL_TENSOR.V_ENC_INPUT_NORM,
    "layer_norm2": MODEL_TENSOR.V_ENC_POST_ATTN_NORM,
    "mlp.fc1": MODEL_TENSOR.V_ENC_FFN_UP,
    "mlp.fc2": MODEL_TENSOR.V_ENC_FFN_DOWN,
}
# LLaVA projector linear_1 / linear_2 sit at indices 0 and 2 of the original nn.Sequential (1 is the GELU).
LLAVA_PROJECTOR = {"linear_1": 0, "linear_2": 2}
CLIP_FFN_ACT = {"quick_gelu": None, "gelu": gguf.Keys.ClipVision.USE_GELU, "silu": gguf.Keys.ClipVision.USE_SILU}


def write_language_model(
    config,
    tensors,
    tokenizer,
    path: str | os.PathLike,
    *,
    ftype: str = "f32",
    chat_template: str | None = None,
    context_length: int | None = None,
    bpe_pre: str | None = None,
    progress: bool = False,
) -> Path:
    """Write a Llama language model as a llama.cpp GGUF (architecture `llama`).

    config: a `LlamaConfig`-like text config (for LLaVA: `vlm.config.text_config`).
    tensors: HF Llama names, `model.layers.N.*` or `layers.N.*`, `embed_tokens`, `norm`, and `lm_head` (left out when
        the embeddings are tied), as `edgekit.model.weights` gives them: `language_model_tensors(CheckpointTensors(
        folder))` streams a checkpoint a tensor at a time (memory: one tensor); `ModelTensors(state_dict)` wraps a
        model in memory.
    tokenizer: the HF tokenizer; SentencePiece (needs its `tokenizer.model`) or byte-level BPE (from tokenizer.json).
    bpe_pre: llama.cpp pre-tokenizer name for a BPE tokenizer whose split regex is not in `BPE_PRE_BY_REGEX`.
    progress: a progress bar over the tensors on stderr when it is a terminal (long for a 7B model).
    """
    weight_type, file_type = _check_ftype(ftype)
    if not hasattr(tensors, "shape"):  # a plain state dict
        tensors = ModelTensors(tensors)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope_type {rope['rope_type']!r}: the GGUF writer supports default RoPE only (use ONNX)")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    dim = head_dim(config)
    n_vocab = config.vocab_size  # embedding rows; the token list is padded to match

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    w = gguf.GGUFWriter(None, arch)
    w.add_context_length(context_length or config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(dim)
    w.add_value_length(dim)
    w.add_rope_dimension_count(dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(n_vocab)
    w.add_file_type(file_type)
    _add_tokenizer(w, tokenizer, n_vocab, bpe_pre)
    if template := chat_template or getattr(tokenizer, "chat_template", None):
        w.add_chat_template(template)

    # Tensor infos first (shapes from the headers), then the data a tensor at a time: memory stays at one tensor.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    plan = []
    for key in tensors:
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"unexpected language-model tensor {key!r}")
        kind, name = found
        shape = tensors.shape(key)
        qtype = _tensor_type(shape, weight_type)
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        heads = {MODEL_TENSOR.ATTN_Q: n_head, MODEL_TENSOR.ATTN_K: n_kv}.get(kind)
        plan.append((key, qtype, heads))

    def data():
        for key, qtype, heads in tqdm(
            plan, desc="gguf", unit="tensor", leave=False, disable=None if progress else True
        ):
            array = tensors[key].detach().float().numpy()
            if heads:
                array = _rope_interleave(array, heads)
            yield gguf.quants.quantize(array, qtype)

    return _write(w, path, data())


def write_mmproj(
    vision_tower_state: Mapping[str, torch.Tensor],
    vision_config,
    projector_state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    exit_layer: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    ftype: str = "f32",
) -> Path:
    """Write a CLIP tower cut after block `exit_layer` plus the LLaVA MLP projector as a clip.cpp mmproj GGUF.

    vision_tower_state: CLIP vision transformer names (`embeddings.*`, `pre_layrnorm.*`, `encoder.layers.N.*`,
        optionally under `vision_model.`); blocks at or past `exit_layer` and `post_layernorm` (unused by LLaVA) are
        skipped, so the full tower's state dict can be passed.
    projector_state: `linear_1.*`, `linear_2.*` of the LLaVA projector (linear, GELU, linear).
    exit_layer: 1-based; the projector sees HF `hidden_states[exit_layer]`.
    """
    weight_type, file_type = _check_ftype(ftype)
    if not 1 <= exit_layer <= vision_config.num_hidden_layers:
        raise ValueError(f"exit_layer {exit_layer} is outside 1..{vision_config.num_hidden_layers} (vision blocks)")
    if vision_config.hidden_act not in CLIP_FFN_ACT:
        raise ValueError(f"vision hidden_act {vision_config.hidden_act!r} not in {sorted(CLIP_FFN_ACT)}")

    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    w.add_clip_projector_type(CLIP_PROJECTOR_MLP)
    w.add_clip_has_vision_encoder(True)
    w.add_file_type(file_type)
    w.add_vision_image_size(vision_config.image_size)
    w.add_vision_patch_size(vision_config.patch_size)
    w.add_vision_embedding_length(vision_config.hidden_size)
    w.add_vision_feed_forward_length(vision_config.intermediate_size)
    w.add_vision_head_count(vision_config.num_attention_heads)
    w.add_vision_attention_layernorm_eps(vision_config.layer_norm_eps)
    w.add_vision_projection_dim(projector_state["linear_2.weight"].shape[0])  # required; mlp reads mm.2's width
    w.add_vision_image_mean([float(v) for v in image_mean])
    w.add_vision_image_std([float(v) for v in image_std])
    # clip.cpp's LLaVA graph runs block_count - 1 blocks unless feature_layer is set; [k] with k blocks runs all k and
    # takes the last output. Negative indices never match there.
    w.add_vision_block_count(exit_layer)
    w.add_array(CLIP_VISION_FEATURE_LAYER, [exit_layer])
    if act_key := CLIP_FFN_ACT[vision_config.hidden_act]:  # neither key set = quick-GELU
        w.add_bool(act_key, True)

    for key, tensor in vision_tower_state.items():
        name = _clip_tensor_name(key.removeprefix("vision_model."), exit_layer)
        if name:
            _add_tensor(w, name, tensor.detach().float().numpy(), weight_type)
    for key, tensor in projector_state.items():
        layer, _, suffix = key.partition(".")
        if layer not in LLAVA_PROJECTOR:
            raise ValueError(f"unexpected projector tensor {key!r}")
        name = gguf.TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=LLAVA_PROJECTOR[layer])
        _add_tensor(w, f"{name}.{suffix}", tensor.detach().float().numpy(), weight_type)
    return _write(w, path)


def quantize_with_llama_cpp(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, *, nthread: int = 0) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (K-quant recipes such as q4_k_m need it)."""
    import llama_cpp  # imported here: loading the compiled library is only needed for this step

    if qtype not in LLAMA_CPP_QTYPES:
        raise ValueError(f"qtype {qtype!r} not in {LLAMA_CPP_QTYPES}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = nthread
    dst = Path(dst)
    partial = dst.with_name(dst.name + ".partial")
    if llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(partial), ctypes.byref(params)) != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp failed to quantize {src} to {qtype}")
    return partial.replace(dst)


def _check_ftype(ftype: str) -> tuple[QType, gguf.LlamaFileType]:
    if ftype not in FTYPES:
        raise ValueError(f"ftype {ftype!r} not in {sorted(FTYPES)}; use quantize_with_llama_cpp for K-quants")
    return FTYPES[ftype]


def _write(w: gguf.GGUFWriter, path: str | os.PathLike, data: Iterable[np.ndarray] | None = None) -> Path:
    """Write to a sibling temp file and rename, so a killed run leaves no half-written GGUF behind. `data`: the
    tensors declared with add_tensor_info, in their order, produced one at a time; None: those added whole."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        w.write_header_to_file(partial)
        w.write_kv_data_to_file()
        if data is None:
            w.write_tensors_to_file()
        else:
            w.write_ti_data_to_file()
            for array in data:
                w.write_tensor_data(array)
        w.close()
    except BaseException:
        w.close()
        partial.unlink(missing_ok=True)
        raise
    return partial.replace(path)


def _tensor_type(shape: Sequence[int], weight_type: QType) -> QType:
    """Norms, biases and other 1-D tensors stay F32 (llama.cpp expects it); Q8_0 needs rows of whole 32-blocks."""
    if len(shape) == 1:
        return QType.F32
    if weight_type == QType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[weight_type][0]:
        return QType.F16
    return weight_type


def _add_tensor(w: gguf.GGUFWriter, name: str, data: np.ndarray, weight_type: QType) -> None:
    qtype = _tensor_type(data.shape, weight_type)
    w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _rope_interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of each head (rotate_half); llama.cpp's RoPE rotates adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _clip_tensor_name(key: str, exit_layer: int) -> str | None:
    if key in CLIP_EMBEDDINGS:  # class_embedding is a bare parameter
        return gguf.TENSOR_NAMES[CLIP_EMBEDDINGS[key]]
    stem, _, suffix = key.rpartition(".")
    if stem in CLIP_EMBEDDINGS:
        return f"{gguf.TENSOR_NAMES[CLIP_EMBEDDINGS[stem]]}.{suffix}"
    if stem == "post_layernorm":
        return None
    parts = stem.split(".", 3)  # encoder.layers.N.<rest>
    if len(parts) == 4 and parts[:2] == ["encoder", "layers"] and parts[3] in CLIP_BLOCK:
        block = int(parts[2])
        return f"{gguf.TENSOR_NAMES[CLIP_BLOCK[parts[3]]].format(bid=block)}.{suffix}" if block < exit_layer else None
    raise ValueError(f"unexpected vision-tower tensor {key!r}")


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer, n_vocab: int, bpe_pre: str | None) -> None:
    """Vocabulary, types, special ids; ids with no token become unused `[PADi]` up to the embedding's row count."""
    sp_file = getattr(tokenizer, "vocab_file", None)
    if sp_file and str(sp_file).endswith(".model") and Path(sp_file).is_file():
        tokens, scores, types = _sentencepiece_vocab(w, sp_file)
    else:
        tokens, types = _bpe_vocab(w, tokenizer, bpe_pre)
        scores = None
    added = tokenizer.added_tokens_decoder
    n_tokens = max(len(tokens), max(added, default=-1) + 1)
    if n_tokens > n_vocab:
        raise ValueError(f"tokenizer has {n_tokens} tokens but the embedding only {n_vocab} rows")
    tokens += [None] * (n_vocab - len(tokens))
    types += [TokenType.UNUSED] * (n_vocab - len(types))
    for tid, tok in added.items():
        if tokens[tid] is None or types[tid] == TokenType.NORMAL:  # keep sentencepiece's unknown/control/byte
            tokens[tid] = tok.content
            types[tid] = TokenType.CONTROL if tok.special else TokenType.USER_DEFINED
    w.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores + [-1000.0] * (n_vocab - len(scores)))

    for tid, add in (
        (tokenizer.bos_token_id, w.add_bos_token_id),
        (tokenizer.eos_token_id, w.add_eos_token_id),
        (tokenizer.unk_token_id, w.add_unk_token_id),
        (tokenizer.pad_token_id, w.add_pad_token_id),
    ):
        if tid is not None:
            add(tid)
    # add_bos/add_eos read off the tokenizer's behaviour: its config flags are unreliable across transformers versions.
    specials = tokenizer.encode("", add_special_tokens=True)
    w.add_add_bos_token(tokenizer.bos_token_id is not None and specials[:1] == [tokenizer.bos_token_id])
    w.add_add_eos_token(tokenizer.eos_token_id is not None and specials[-1:] == [tokenizer.eos_token_id])


def _sentencepiece_vocab(w: gguf.GGUFWriter, sp_file) -> tuple[list[str], list[float], list[TokenType]]:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    sp = SentencePieceProcessor(model_file=str(sp_file))
    proto = sp_pb2.ModelProto.FromString(Path(sp_file).read_bytes())
    w.add_tokenizer_model("llama")
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    ids = range(sp.vocab_size())
    types = [
        TokenType.UNKNOWN
        if sp.is_unknown(i)
        else TokenType.CONTROL
        if sp.is_control(i)
        else TokenType.UNUSED
        if sp.is_unused(i)
        else TokenType.BYTE
        if sp.is_byte(i)
        else TokenType.NORMAL
        for i in ids
    ]
    return [sp.id_to_piece(i) for i in ids], [sp.get_score(i) for i in ids], types


def _bpe_vocab(w: gguf.GGUFWriter, tokenizer, bpe_pre: str | None) -> tuple[list[str], list[TokenType]]:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or (spec["decoder"] or {}).get("type") != "ByteLevel":
        raise ValueError("tokenizer is neither SentencePiece (no tokenizer.model found) nor byte-level BPE")
    pre = bpe_pre or _bpe_pre_name(spec["pre_tokenizer"] or {})
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    return tokens, [TokenType.NORMAL] * len(tokens)


def _bpe_pre_name(pre_tokenizer: dict) -> str:
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    for step in steps:
        if step.get("type") == "Split" and step["pattern"].get("Regex") in BPE_PRE_BY_REGEX:
            return BPE_PRE_BY_REGEX[step["pattern"]["Regex"]]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own regex, built into the ByteLevel step
    raise ValueError("unknown BPE pre-tokenizer; pass bpe_pre= with the matching llama.cpp name (llama-vocab.cpp)")
