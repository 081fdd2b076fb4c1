"""Tiny random checkpoints in the exact on-disk layout of the real hub repos.

Tests, benchmarks and the demo model build models here: config.json + model.safetensors, a tokenizer trained
locally (SentencePiece like LLaVA's Llama/Vicuna, byte-level BPE like Llama 3), an image processor and a processor
with its chat template, so `AutoProcessor` and `AutoModelForImageTextToText` load them like the real repos.
Depth is real where depth matters (24 CLIP blocks for LLaVA, 32 local + 8 global for Llama 3.2 Vision); width is tiny.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

# Chat templates written in the same shape as the real repos' (llava-hf: "USER: <image>\n... ASSISTANT:";
# Llama 3.2 Vision: header ids and <|eot_id|>). Images are rendered before the message text, as there.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_WORDS = (
    "the a an and or of to in on with for is are was be it this that what which how why where who can you i "
    "me my your please tell show describe explain make build write help steps first then next finally "
    "image picture photo color colour red green blue yellow white black circle square triangle cup house tree "
    "left right top bottom middle one two three four five many shape object sure here sorry cannot with that "
    "safe unsafe question answer user assistant system hello world python process kill photo shoot history"
).split()


def default_corpus(n_sentences: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences, enough for a tokenizer to learn sensible merges."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_sentences):
        length = int(torch.randint(3, 14, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (length,), generator=g).tolist()
        out.append(" ".join(_WORDS[i] for i in idx) + (" ?" if idx[0] % 3 == 0 else " ."))
    return out


def train_sentencepiece_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A Llama-style SentencePiece BPE tokenizer (byte fallback, <unk>=0, <s>=1, </s>=2), as LLaVA-1.5 ships."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        tok = LlamaTokenizer.from_pretrained(tmp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.sentencepiece_model = model.getvalue()  # written next to tokenizer.json, as the real repos do
    return tok


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A Llama-3-style byte-level BPE tokenizer with Llama 3's special tokens appended after the learned vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(list(corpus), trainer)
    backend.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )


@dataclass(frozen=True)
class TinySizes:
    """Widths are tiny; depths follow the real models where early exit depends on them."""

    vision_hidden: int = 32
    vision_layers: int = 24
    vision_heads: int = 4
    image_size: int = 28
    patch_size: int = 7
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 512
    global_layers: int = 8  # Llama 3.2 Vision only


def _llama_text_config(tok, s: TinySizes, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.text_hidden,
        intermediate_size=2 * s.text_hidden,
        num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _clip_vision_config(s: TinySizes, image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=s.vision_hidden,
        intermediate_size=4 * s.vision_hidden,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=image_size,
        patch_size=s.patch_size,
        projection_dim=s.vision_hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _llava_tokenizer(corpus, s: TinySizes):
    tok = train_sentencepiece_tokenizer(corpus, s.vocab_size)
    # LLaVA-1.5 appends <image> then <pad> after the base vocabulary (ids 32000, 32001 in the real repo).
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def _llava(tok, s: TinySizes):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    config = LlavaConfig(
        vision_config=_clip_vision_config(s, s.image_size),
        text_config=_llama_text_config(tok, s),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(s.image_size // s.patch_size) ** 2,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": s.image_size},
        crop_size={"height": s.image_size, "width": s.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaForConditionalGeneration(config), _llava_processor(LlavaProcessor, image_processor, tok, s)


def _llava_processor(processor_class, image_processor, tok, s: TinySizes):
    """LLaVA's processor as the hub repos configure it: CLS counted among the image tokens, then dropped."""
    return processor_class(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=s.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _llava_next(tok, s: TinySizes):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    # Tiles of image_size; the grid pinpoints mirror the real 336 / 672 / 1008 set at tiny scale.
    base = s.image_size
    pinpoints = [[base, 2 * base], [2 * base, base], [2 * base, 2 * base], [3 * base, base], [base, 3 * base]]
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(s, base),
        text_config=_llama_text_config(tok, s),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_grid_pinpoints=pinpoints,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": base},
        crop_size={"height": base, "width": base},
        image_grid_pinpoints=pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaNextForConditionalGeneration(config), _llava_processor(LlavaNextProcessor, image_processor, tok, s)


def _mllama(tok, s: TinySizes):
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    # The real tower taps local blocks 4, 8, 16, 24 and 31 of 32 (0-based indices 3, 7, 15, 23, 30).
    taps = (
        [3, 7, 15, 23, 30]
        if s.vision_layers == 32
        else sorted({max(0, s.vision_layers * f // 32 - 1) for f in (4, 8, 16, 24, 31)})
    )
    vision = MllamaVisionConfig(
        hidden_size=s.vision_hidden,
        attention_heads=s.vision_heads,
        num_hidden_layers=s.vision_layers,
        num_global_layers=s.global_layers,
        intermediate_size=4 * s.vision_hidden,
        image_size=s.image_size,
        patch_size=s.patch_size,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        intermediate_layers_indices=taps,
        vision_output_dim=s.vision_hidden * (len(taps) + 1),
    )
    image_id = tok.convert_tokens_to_ids("<|image|>")
    text = MllamaTextConfig(
        vocab_size=len(tok),
        hidden_size=s.text_hidden,
        intermediate_size=2 * s.text_hidden,
        num_hidden_layers=s.text_layers + 2,
        cross_attention_layers=[1, s.text_layers + 1],
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_kv_heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    image_processor = MllamaImageProcessor(
        size={"height": s.image_size, "width": s.image_size},
        max_image_tiles=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=LLAMA3_CHAT_TEMPLATE)
    model = MllamaForConditionalGeneration(config)
    # Mllama initialises its tanh gates (cross-attention, tile embeddings) to 0, which shuts the image out of the
    # logits entirely; a trained model's gates are open, so open them, or no test could see the vision tower.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate", "_gate")):
                param.uniform_(0.5, 1.0)
    return model, processor


# family -> (tokenizer builder, model + processor builder)
_BUILDERS = {
    "llava": (_llava_tokenizer, _llava),
    "llava_next": (_llava_tokenizer, _llava_next),
    "mllama": (lambda corpus, s: train_bpe_tokenizer(corpus, s.vocab_size), _mllama),
}
TINY_FAMILIES = tuple(_BUILDERS)


def build_tiny(family: str, sizes: TinySizes | None = None, seed: int = 0, corpus: Iterable[str] | None = None):
    """An in-memory tiny model and its processor for `family` (a config.model_type)."""
    sizes = sizes or (TinySizes(vision_layers=32) if family == "mllama" else TinySizes())
    make_tokenizer, make_model = _BUILDERS[family]
    tok = make_tokenizer(corpus or default_corpus(), sizes)
    torch.manual_seed(seed)
    model, processor = make_model(tok, sizes)
    return model.eval(), processor


def save_tiny(model, processor, out_dir: str | Path) -> Path:
    """Save as the hub repos are laid out (plus tokenizer.model for SentencePiece tokenizers)."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    sp_model = getattr(processor.tokenizer, "sentencepiece_model", None)
    if sp_model:
        (out_dir / "tokenizer.model").write_bytes(sp_model)
    return out_dir


def make_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0, sizes: TinySizes | None = None) -> Path:
    """Build and save a tiny random checkpoint of `family` into `out_dir` (replacing it)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model, processor = build_tiny(family, sizes, seed)
    return save_tiny(model, processor, out_dir)
