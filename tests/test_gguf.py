"""GGUF export: tiny Llama / LLaVA built locally, written by edgekit.export.gguf, run by llama-cpp-python."""

import ctypes
import json
import random

import gguf as gguf_lib
import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp import mtmd_cpp
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from edgekit.export import gguf

WORDS = (
    "the a cat dog sees runs on under big small red blue image photo of with and is was robot phone edge "
    "model layer quick brown fox jumps over lazy night café naïve 2024 3.14 don't it's"
).split()
PROBES = [
    "the cat sees a photo",
    "A Robot runs under the blue phone!",
    "naïve café, 2024 & 3.14?",
    "it's  two spaces\nand a newline",
    "zebra xylophone qwerty",
]  # last: unseen words -> byte fallback
LLAMA3_SPLIT = next(iter(gguf.BPE_PRE_BY_REGEX))  # the Llama 3 tokenizer.json split regex
N_CTX = 128


def corpus(n=400):
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".!?,") for _ in range(n)]


def train_sentencepiece(out_dir):
    """Llama-2 layout: tokenizer.model (SentencePiece BPE, byte fallback) + tokenizer_config.json."""
    import sentencepiece as spm

    (out_dir / "corpus.txt").write_text("\n".join(corpus()))
    spm.SentencePieceTrainer.train(
        input=str(out_dir / "corpus.txt"),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    return LlamaTokenizer.from_pretrained(out_dir)


def train_byte_level_bpe():
    """Llama-3 style: byte-level BPE with Llama 3's split regex and <|begin_of_text|> prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])


def tiny_llama_config(n_vocab):
    return LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def tiny_llama(tokenizer, extra_rows=5):
    """Random tiny Llama; extra embedding rows beyond the tokenizer exercise [PADi] placeholder tokens."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer) + extra_rows)).eval()


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def tokenizers(sp_tokenizer):
    return {"sentencepiece": sp_tokenizer, "byte_level_bpe": train_byte_level_bpe()}


def load(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=2, verbose=False, **kw)


def field(reader, key):
    return reader.fields[key].contents()


def llama_cpp_logits(path, ids):
    llm = load(path, logits_all=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)]), llm


@torch.no_grad()
def torch_logits(model, ids):
    return model(torch.tensor([ids])).logits[0].numpy()


def sample_ids(tokenizer, n=120):
    """Enough positions that a few near-tied logits of a random model cannot sink the top-1 agreement."""
    return tokenizer(" ".join(corpus(40))).input_ids[:n]


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level_bpe"])
def test_f32_logits_and_tokenization_match(kind, tokenizers, tmp_path):
    tokenizer = tokenizers[kind]
    model = tiny_llama(tokenizer)
    path = gguf.write_language_model(model.config, model.state_dict(), tokenizer, tmp_path / "lm.gguf")

    ids = sample_ids(tokenizer)
    got, llm = llama_cpp_logits(path, ids)
    assert np.abs(got - torch_logits(model, ids)).max() <= 1e-3

    for text in PROBES:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer(text).input_ids, text
    assert llm.token_bos() == tokenizer.bos_token_id and llm.token_eos() == tokenizer.eos_token_id
    assert llm.detokenize(tokenizer(PROBES[0], add_special_tokens=False).input_ids).decode().strip() == PROBES[0]


def test_metadata_vocab_padding_and_chat_template(sp_tokenizer, tmp_path):
    model = tiny_llama(sp_tokenizer, extra_rows=5)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    path = gguf.write_language_model(
        model.config, model.state_dict(), sp_tokenizer, tmp_path / "lm.gguf", chat_template=template, context_length=32
    )
    r = gguf_lib.GGUFReader(path)
    tokens, types = field(r, gguf_lib.Keys.Tokenizer.LIST), field(r, gguf_lib.Keys.Tokenizer.TOKEN_TYPE)
    n = len(sp_tokenizer)
    assert len(tokens) == model.config.vocab_size
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 5)] and set(types[n:]) == {gguf_lib.TokenType.UNUSED}
    assert types[0] == gguf_lib.TokenType.UNKNOWN and types[1] == types[2] == gguf_lib.TokenType.CONTROL
    assert types[tokens.index("<0x41>")] == gguf_lib.TokenType.BYTE
    assert field(r, gguf_lib.Keys.Tokenizer.MODEL) == "llama" and field(r, gguf_lib.Keys.Tokenizer.ADD_BOS) is True
    assert field(r, gguf_lib.Keys.Tokenizer.CHAT_TEMPLATE) == template
    assert field(r, gguf_lib.Keys.LLM.CONTEXT_LENGTH.format(arch="llama")) == 32
    assert [p.name for p in tmp_path.iterdir()] == ["lm.gguf"]  # no .partial left behind


@pytest.mark.parametrize("ftype, max_diff", [("f16", 2e-3), ("q8_0", 5e-2)])
def test_python_quantized_logits(ftype, max_diff, sp_tokenizer, tmp_path):
    model = tiny_llama(sp_tokenizer)
    path = gguf.write_language_model(model.config, model.state_dict(), sp_tokenizer, tmp_path / "lm.gguf", ftype=ftype)
    ids = sample_ids(sp_tokenizer)
    got, want = llama_cpp_logits(path, ids)[0], torch_logits(model, ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    assert np.abs(got - want).max() <= max_diff


def test_k_quant_through_llama_cpp(sp_tokenizer, tmp_path):
    model = tiny_llama(sp_tokenizer)
    src = gguf.write_language_model(model.config, model.state_dict(), sp_tokenizer, tmp_path / "f32.gguf")
    dst = gguf.quantize_with_llama_cpp(src, tmp_path / "q4_k_m.gguf", "q4_k_m", nthread=2)
    r = gguf_lib.GGUFReader(dst)
    assert field(r, gguf_lib.Keys.General.FILE_TYPE) == gguf_lib.LlamaFileType.MOSTLY_Q4_K_M
    ids = sample_ids(sp_tokenizer)
    got, _ = llama_cpp_logits(dst, ids)
    assert (got.argmax(-1) == torch_logits(model, ids).argmax(-1)).mean() >= 0.8  # 4-bit, near-tied random logits


def test_bad_arguments_fail_loudly(sp_tokenizer, tmp_path):
    model = tiny_llama(sp_tokenizer)
    with pytest.raises(ValueError, match="ftype"):
        gguf.write_language_model(model.config, model.state_dict(), sp_tokenizer, tmp_path / "x.gguf", ftype="q4_k")
    with pytest.raises(ValueError, match="unexpected language-model tensor"):
        gguf.write_language_model(
            model.config,
            {**model.state_dict(), "model.extra.weight": torch.zeros(2)},
            sp_tokenizer,
            tmp_path / "x.gguf",
        )
    small = tiny_llama(sp_tokenizer, extra_rows=-10)
    with pytest.raises(ValueError, match="embedding only"):
        gguf.write_language_model(small.config, small.state_dict(), sp_tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


# ---- mmproj: tiny LLaVA (CLIP tower 6 blocks, 32x32 images of 8x8 patches) -------------------------------------------

EXIT_LAYER = 3
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def tiny_llava(sp_tokenizer):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    text = tiny_llama_config(len(sp_tokenizer) + 5)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=len(sp_tokenizer),
        vision_feature_layer=EXIT_LAYER,
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def write_llava(vlm, tokenizer, tmp_path, exit_layer=EXIT_LAYER):
    inner = vlm.model
    lm = gguf.write_language_model(
        vlm.config.text_config,
        {**inner.language_model.state_dict(), "lm_head.weight": vlm.lm_head.weight},
        tokenizer,
        tmp_path / "lm.gguf",
    )
    mmproj = gguf.write_mmproj(
        inner.vision_tower.state_dict(),
        vlm.config.vision_config,
        inner.multi_modal_projector.state_dict(),
        tmp_path / "mmproj.gguf",
        exit_layer=exit_layer,
        image_mean=MEAN,
        image_std=STD,
    )
    return lm, mmproj


def test_mmproj_metadata(tiny_llava, sp_tokenizer, tmp_path):
    _, mmproj = write_llava(tiny_llava, sp_tokenizer, tmp_path)
    r = gguf_lib.GGUFReader(mmproj)
    names = {t.name for t in r.tensors}
    assert field(r, gguf_lib.Keys.ClipVision.BLOCK_COUNT) == EXIT_LAYER
    assert field(r, gguf.CLIP_VISION_FEATURE_LAYER) == [EXIT_LAYER]
    assert field(r, gguf_lib.Keys.Clip.PROJECTOR_TYPE) == "mlp"
    assert gguf_lib.Keys.ClipVision.USE_GELU not in r.fields  # quick-GELU for OpenAI CLIP
    assert f"v.blk.{EXIT_LAYER - 1}.attn_q.weight" in names and f"v.blk.{EXIT_LAYER}.attn_q.weight" not in names
    assert {"v.class_embd", "mm.0.weight", "mm.2.bias"} <= names and not any("post_ln" in n for n in names)
    with pytest.raises(ValueError, match="exit_layer 7"):
        write_llava(tiny_llava, sp_tokenizer, tmp_path, exit_layer=7)


@torch.no_grad()
def torch_image_features(vlm, image):
    """HF LLaVA's features (hidden_states[EXIT_LAYER], CLS dropped, projected) and the same in llama.cpp's layout."""
    pixels = (
        torch.tensor(image).permute(2, 0, 1)[None].float() / 255 - torch.tensor(MEAN)[:, None, None]
    ) / torch.tensor(STD)[:, None, None]
    hf = vlm.model.get_image_features(pixels, vision_feature_layer=EXIT_LAYER, vision_feature_select_strategy="default")
    return hf.pooler_output[0].numpy(), llama_cpp_cls_last_layout(vlm.model, pixels).numpy()


def llama_cpp_cls_last_layout(inner, pixels):
    """The layout of llama.cpp's LLaVA graph (ggml-org/llama.cpp#25814): CLS appended after the patches, positions
    0..n in that order, rows 1..n kept (patch 0 dropped, CLS kept)."""
    tower = inner.vision_tower
    emb = tower.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([patches, emb.class_embedding.expand(1, 1, -1)], dim=1) + emb.position_embedding.weight[None]
    x = tower.pre_layrnorm(x)
    for layer in tower.encoder.layers[:EXIT_LAYER]:
        x = layer(x, attention_mask=None)
    return inner.multi_modal_projector(x[0, 1:])


def test_mmproj_loads_and_encodes_in_mtmd(tiny_llava, sp_tokenizer, tmp_path):
    lm, mmproj = write_llava(tiny_llava, sp_tokenizer, tmp_path)
    llm = load(lm)
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx, "mtmd failed to load the mmproj"
    try:
        assert mtmd_cpp.mtmd_support_vision(ctx)
        image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # already the tower's size
        embd = encode_image(ctx, image, n_embd=tiny_llava.config.text_config.hidden_size)
    finally:
        mtmd_cpp.mtmd_free(ctx)

    hf, cls_last = torch_image_features(tiny_llava, image)
    n_patches = (32 // 8) ** 2
    assert embd.shape == hf.shape == (n_patches, tiny_llava.config.text_config.hidden_size)
    assert np.isfinite(embd).all()
    diff_hf, diff_layout = np.abs(embd - hf).max(), np.abs(embd - cls_last).max()
    print(
        f"mmproj image embeddings: max|diff| vs HF {diff_hf:.2e}, vs llama.cpp CLS-last layout {diff_layout:.2e}, "
        f"max|HF| {np.abs(hf).max():.2e}"
    )
    # Weights are right if llama.cpp matches either HF or its own (upstream-bug) token layout.
    assert min(diff_hf, diff_layout) <= 1e-3


def encode_image(ctx, image, n_embd):
    """mtmd_tokenize a one-image prompt, encode its image chunk, and copy the embeddings out."""
    h, w, _ = image.shape
    data = np.ascontiguousarray(image).ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    bitmap = mtmd_cpp.mtmd_bitmap_init(w, h, data)
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    text = mtmd_cpp.mtmd_input_text()
    marker = mtmd_cpp.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
    try:
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        images = [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
        images = [c for c in images if mtmd_cpp.mtmd_input_chunk_get_type(c) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert len(images) == 1
        n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(images[0])
        assert mtmd_cpp.mtmd_encode_chunk(ctx, images[0]) == 0
        out = mtmd_cpp.mtmd_get_output_embd(ctx)
        return np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
