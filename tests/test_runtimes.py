"""One generate() over PyTorch, ONNX Runtime, llama.cpp (mtmd, runtime `gguf`) and the hybrid, on the tiny LLaVA
exported at exit k.

Oracles: transformers' greedy generate with the tower exiting at k. At F32 the hybrid (ONNX vision -> embeddings ->
llama.cpp decoder) and ONNX Runtime must be token-identical to it, compared up to the first eos on both sides.
llama.cpp's own vision path (mtmd) is measured and printed, not gated: its LLaVA graph orders CLS after the patches
(ggml-org/llama.cpp#25814) and it preprocesses images itself, so exact parity is impossible upstream today.
The ONNX runtime runs with torch and transformers unimportable, and the bench harness reports the peak memory of the
runtime's own process, not its parent's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import full_precision_profile, sample_image

from edgekit.devices.bench import bench_in_subprocess, status_mib
from edgekit.devices.onnx_runtime import OnnxVLM
from edgekit.devices.profiles import load_profile
from edgekit.devices.runtime import RUNTIMES, Prompt, export_files, open_runtime, processor_inputs, until_eos
from edgekit.devices.torch_runtime import TorchRuntime
from edgekit.errors import UserError
from edgekit.export.artifacts import export_artifacts
from edgekit.model.loading import load
from edgekit.model.surgery import set_exit_layer

K = 12
MAX_NEW_TOKENS = 32
QUESTIONS = [
    "what colour is the shape in this picture",
    "describe the image",
    "is there a circle or a square",
    "tell me about the house and the tree",
]
IMAGE_SIZES = [(40, 60), (60, 40), (36, 36), (30, 84)]
PROMPTS = [Prompt(sample_image(100 + i, IMAGE_SIZES[i]), q) for i, q in enumerate(QUESTIONS)]
LLAMA = {"n_threads": 1, "n_ctx": 256}  # one thread: llama.cpp's spinning workers crawl on a shared 2-core box


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, tmp_path_factory):
    """The tiny LLaVA, its PyTorch runtime and reference tokens, and an F32 export (ONNX fp32, GGUF f32)."""
    loaded = load(tiny_checkpoints["llava"], dtype="float32")
    f32 = full_precision_profile()
    folder = export_artifacts(loaded, K, f32, tmp_path_factory.mktemp("rt") / "f32").folder
    torch_rt = TorchRuntime(loaded, K)
    reference = [torch_rt.generate(p, MAX_NEW_TOKENS) for p in PROMPTS]
    return loaded, folder, torch_rt, reference


def test_reference_is_not_vacuous(tiny):
    _, _, _, reference = tiny
    assert sum(map(len, reference)) >= 4 * len(PROMPTS)
    assert len({tuple(r) for r in reference}) == len(PROMPTS)  # depends on the image and question


@pytest.mark.parametrize("kind", ["hybrid", "onnx"])
def test_f32_token_identical_to_pytorch(tiny, kind):
    _, folder, torch_rt, reference = tiny
    runtime = open_runtime(kind, folder, **(LLAMA if kind == "hybrid" else {}))
    eos = torch_rt.eos
    got = [until_eos(runtime.generate(p, MAX_NEW_TOKENS), eos) for p in PROMPTS]
    want = [until_eos(r, eos) for r in reference]
    print(
        f"{kind} F32 k={K}: {sum(g == w for g, w in zip(got, want))}/{len(PROMPTS)} prompts token-identical, "
        f"{sum(map(len, got))} tokens"
    )
    assert got == want


def test_embedding_batches_equal_token_batches(tiny):
    """decode_embeddings of the LM's own token embeddings gives the logits of decode_tokens (positions, masks and the
    embedding batch layout are right), and both match PyTorch's logits."""
    from edgekit.devices.llama_runtime import LlamaDecoder

    loaded, folder, _, _ = tiny
    decoder = LlamaDecoder(folder / "lm-f32.gguf", **LLAMA)
    ids = processor_inputs(loaded.processor, PROMPTS[0])["input_ids"][0, :20]
    decoder.reset()
    by_tokens = decoder.decode_tokens(ids.tolist(), 0)
    with torch.no_grad():
        embeds = loaded.model.get_input_embeddings()(ids)
        want = loaded.model.lm_head(loaded.model.model.language_model(inputs_embeds=embeds[None]).last_hidden_state)
    decoder.reset()
    by_embeds = decoder.decode_embeddings(embeds[:7].numpy(), 0)  # first part as embeddings, the rest as tokens
    by_mixed = decoder.decode_tokens(ids[7:].tolist(), 7)
    decoder.reset()
    decoder.decode_embeddings(embeds.numpy(), 0)
    all_embeds = decoder.last_logits()
    want = want[0, -1].numpy()
    diffs = [float(np.abs(x - want).max()) for x in (by_tokens, by_mixed, all_embeds)]
    print(f"llama.cpp F32 last logits vs PyTorch (tokens, mixed, embeddings): {', '.join(f'{d:.1e}' for d in diffs)}")
    assert max(diffs) <= 1e-3
    assert by_embeds.shape == want.shape
    with pytest.raises(ValueError, match="embeddings of shape"):
        decoder.decode_embeddings(np.zeros((2, 3), np.float32), 0)


def test_mtmd_path_measured(tiny):
    """llama.cpp end to end: weights checked through the image embeddings (equal to transformers' or to the
    upstream CLS-last layout), tokens measured against PyTorch and printed."""
    loaded, folder, torch_rt, reference = tiny
    runtime = open_runtime("gguf", folder, **LLAMA)
    model = loaded.model
    set_exit_layer(model, K)

    # A square image at the tower's size: mtmd's pad-to-square and HF's centre crop then see the same pixels.
    size = model.config.vision_config.image_size
    image = sample_image(7, (size, size))
    embd = runtime.vlm.image_embeddings(image)
    inputs = processor_inputs(loaded.processor, Prompt(image, "x"))
    with torch.no_grad():
        hf = loaded.family.features_per_layer(model, inputs, [K])[K].numpy()
        cls_last = _cls_last_layout(model, inputs["pixel_values"]).numpy()
    diff_hf, diff_layout = float(np.abs(embd - hf).max()), float(np.abs(embd - cls_last).max())
    cos = float((embd * hf).sum() / np.linalg.norm(embd) / np.linalg.norm(hf))
    print(
        f"mtmd image embeddings k={K}: max|diff| vs HF {diff_hf:.2e} (cosine {cos:.3f}), vs CLS-last layout "
        f"{diff_layout:.2e}, max|HF| {np.abs(hf).max():.2e}"
    )
    assert embd.shape == hf.shape and min(diff_hf, diff_layout) <= 1e-3

    eos = torch_rt.eos
    same_text, identical, agreement = 0, 0, []
    for prompt, ref in zip(PROMPTS, reference):
        hf_ids = processor_inputs(loaded.processor, prompt)["input_ids"][0].tolist()
        mtmd_ids = runtime.vlm.prompt_tokens(prompt.image, runtime.prompt_text(prompt))
        same_text += [t for t in hf_ids if t != model.config.image_token_id] == [t for t in mtmd_ids if t is not None]
        got = until_eos(runtime.generate(prompt, MAX_NEW_TOKENS), eos)
        want = until_eos(ref, eos)
        assert 1 <= len(got) <= MAX_NEW_TOKENS and all(0 <= t < model.config.text_config.vocab_size for t in got)
        n = min(len(got), len(want))
        agreement.append(float(np.mean([g == w for g, w in zip(got[:n], want[:n])])))
        identical += got == want
    print(
        f"mtmd generate k={K}: text tokens equal to HF's on {same_text}/{len(PROMPTS)} prompts; "
        f"{identical}/{len(PROMPTS)} token-identical to PyTorch; positional agreement {np.mean(agreement):.2f}"
    )


def _cls_last_layout(model, pixels):
    """llama.cpp's LLaVA graph today (ggml-org/llama.cpp#25814): CLS appended after the patches, positions in that
    order, rows 1.. kept (patch 0 dropped, CLS passed on)."""
    tower = model.model.vision_tower
    emb = tower.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([patches, emb.class_embedding.expand(1, 1, -1)], 1) + emb.position_embedding.weight[None]
    x = tower.pre_layrnorm(x)
    for layer in tower.encoder.layers[:K]:
        x = layer(x, attention_mask=None)
    return model.model.multi_modal_projector(x[0, 1:])


def test_quantized_artifacts_run_in_every_runtime(tiny, tmp_path):
    """The Jetson profile's artifacts (ONNX fp16, LM Q4_K_M, mmproj f16) run in each runtime; agreement printed."""
    loaded, _, torch_rt, reference = tiny
    jetson = ("onnx", "gguf", "mmproj")  # the mmproj opted in, to run llama.cpp's own pipeline too
    folder = export_artifacts(loaded, K, load_profile("jetson"), tmp_path / "jetson", jetson, nthread=2).folder
    eos = torch_rt.eos
    for kind in ("onnx", "hybrid", "gguf"):
        runtime = open_runtime(kind, folder, **({} if kind == "onnx" else LLAMA))
        got = [until_eos(runtime.generate(p, MAX_NEW_TOKENS), eos) for p in PROMPTS[:2]]
        assert all(1 <= len(g) <= MAX_NEW_TOKENS for g in got)
        same = sum(g == until_eos(r, eos) for g, r in zip(got, reference))
        print(f"jetson artifacts, {kind}: {same}/{len(got)} prompts token-identical to PyTorch F32")


def test_open_runtime_errors(tiny, tmp_path):
    loaded, folder, _, _ = tiny
    with pytest.raises(UserError, match="unknown runtime 'tflite'"):
        open_runtime("tflite", folder)
    with pytest.raises(UserError, match="no manifest.json"):
        open_runtime("onnx", tmp_path)
    onnx_only = export_artifacts(loaded, K, load_profile("phone"), tmp_path / "onnx", formats=("onnx",)).folder
    with pytest.raises(UserError, match="no lm_gguf for the hybrid runtime"):
        open_runtime("hybrid", onnx_only)


def test_timed_runs_the_same_steps_in_every_runtime(tiny, tiny_checkpoints):
    """Every runtime opens by its name (pytorch over a checkpoint) and times a fixed amount of work."""
    _, folder, _, reference = tiny
    options = {"pytorch": {"exit_layer": K}, "onnx": {}, "gguf": LLAMA, "hybrid": LLAMA, "ortgenai": {}}
    for kind in RUNTIMES:
        runtime = open_runtime(kind, tiny_checkpoints["llava"] if kind == "pytorch" else folder, **options[kind])
        run = runtime.timed(PROMPTS[0], 5)
        assert run["steps"] == 5 and run["decode_s"] > 0 and run["prefill_s"] > 0 and run["vision_s"] >= 0, kind
        if kind == "pytorch":
            assert runtime.generate(PROMPTS[0], MAX_NEW_TOKENS) == reference[0]


_WITHOUT_TORCH = """
import json, sys
import numpy as np

class Refuse:  # every import of torch or transformers fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} imported by the ONNX runtime")

sys.meta_path.insert(0, Refuse())
from edgekit.devices.onnx_runtime import OnnxVLM

with np.load(sys.argv[2]) as data:
    inputs = {key: data[key] for key in data.files}
print(json.dumps(OnnxVLM(sys.argv[1]).generate(inputs, int(sys.argv[3])).tolist()))
"""


def test_onnx_runtime_needs_neither_torch_nor_transformers(tiny, tmp_path):
    """What a phone has: numpy and onnxruntime. The same tokens as in this process, where torch is loaded."""
    loaded, folder, _, _ = tiny
    onnx_dir = export_files("onnx", folder)["onnx_dir"]
    inputs = {key: value.numpy() for key, value in processor_inputs(loaded.processor, PROMPTS[1]).items()}
    np.savez(tmp_path / "inputs.npz", **inputs)
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, str(onnx_dir), str(tmp_path / "inputs.npz"), str(MAX_NEW_TOKENS)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    want = OnnxVLM(onnx_dir).generate(inputs, MAX_NEW_TOKENS).tolist()
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want and len(want[0]) >= 4


def test_bench_reports_the_runtime_process_own_peak(tiny):
    """ru_maxrss would carry this process's high-water mark into the child; VmHWM is the child's alone."""
    _, folder, _, _ = tiny
    ballast = np.ones(1024 * 1024 * 1024, np.uint8)  # 1 GiB, every page touched
    parent_peak = status_mib("VmHWM")
    row = bench_in_subprocess("onnx", folder, prompts=2, max_new_tokens=4)
    del ballast
    print(
        f"bench onnx: peak {row['peak_rss_mib']} MiB ({row['baseline_rss_mib']} before weights); this process's "
        f"peak {parent_peak:.1f} MiB"
    )
    assert 0 < row["baseline_rss_mib"] <= row["peak_rss_mib"] < parent_peak - 768
    assert row["runtime"] == "onnx" and row["prompts"] == 2 and row["first_token_ms"] > 0 and row["decode_tok_s"] > 0
