"""The device runtime: onnx, gguf, hybrid and ortgenai opened from the artifact folder alone, with torch and
transformers unimportable, on the tiny LLaVA-1.5 exported at F32 (ONNX fp32, GGUF f32).

Oracles: transformers' own processor (its chat text, input_ids and pixel_values, and its decode) for the device
processor; for the answers, each runtime fed by transformers' processor as it was before the device processor, and
for fp32 ONNX and the hybrid also PyTorch (`TorchRuntime`), token for token up to a near tie of PyTorch's logits, on
eval suite prompts plus images of other sizes and modes (the suite's are at the tower's size, so they skip the resize).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import full_precision_profile, sample_image
from PIL import Image
from transformers import AutoProcessor

from edgekit.devices.genai_runtime import OrtGenaiRuntime
from edgekit.devices.processor import DeviceProcessor
from edgekit.devices.runtime import (
    HybridRuntime,
    LlamaCppRuntime,
    OnnxRuntime,
    Prompt,
    chat_text,
    export_files,
    open_processor,
    until_eos,
)
from edgekit.devices.torch_runtime import TorchRuntime
from edgekit.errors import UserError
from edgekit.export.artifacts import export_artifacts
from edgekit.model.loading import load
from edgekit.safety.suite import builtin_suite

K = 12
MAX_NEW_TOKENS = 24
LLAMA = {"n_threads": 1, "n_ctx": 256}  # one thread: llama.cpp's spinning workers crawl on a shared 2-core box
# Logits closer than this are float noise apart: llama.cpp's f32 kernels add in another order than torch's, and a random
# tiny model's greedy answers pass near ties.
NEAR_TIE = 1e-3
DEVICE_KINDS = ("onnx", "gguf", "hybrid", "ortgenai")
OPTIONS = {"onnx": {}, "gguf": LLAMA, "hybrid": LLAMA, "ortgenai": {}}


def _odd_images() -> list[Image.Image]:
    """Images the resize, the crop's padding and the RGB conversion all act on."""
    rng = np.random.RandomState(5)
    rgba = Image.fromarray((rng.rand(30, 50, 4) * 255).astype("uint8"), "RGBA")
    grey = Image.fromarray((rng.rand(50, 30) * 255).astype("uint8"), "L")
    return [sample_image(100 + i, size) for i, size in enumerate([(40, 60), (60, 40), (30, 84), (9, 20)])] + [
        rgba,
        grey,
    ]


PROMPTS = [Prompt(item.image(), item.prompt) for item in builtin_suite().select("eval", limit_per_kind=4)]
PROMPTS += [Prompt(image, "what is in this picture") for image in _odd_images()]


@pytest.fixture(scope="module")
def f32(tiny_checkpoints, tmp_path_factory):
    """The tiny LLaVA and its F32 export folder."""
    loaded = load(tiny_checkpoints["llava"], dtype="float32")
    return loaded, export_artifacts(
        loaded, K, full_precision_profile(), tmp_path_factory.mktemp("device") / "f32"
    ).folder


def test_processor_equals_transformers(f32):
    _, folder = f32
    processor_dir = export_files("onnx", folder)["processor_dir"]
    hf, device = AutoProcessor.from_pretrained(processor_dir), DeviceProcessor(processor_dir)
    for prompt in PROMPTS:
        text = chat_text(hf, prompt.text)
        assert chat_text(device, prompt.text) == text
        want, got = hf(images=prompt.image, text=text, return_tensors="np"), device(images=prompt.image, text=text)
        assert got["input_ids"].dtype == np.int64 and got["pixel_values"].dtype == np.float32
        assert np.array_equal(got["input_ids"], want["input_ids"])
        assert np.array_equal(got["attention_mask"], want["attention_mask"])
        assert got["pixel_values"].shape == want["pixel_values"].shape
        np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
        ids = want["input_ids"][0].tolist()
        assert device.tokenizer.decode(ids) == hf.tokenizer.decode(ids, skip_special_tokens=True)
        assert device.tokenizer.decode(ids, False) == hf.tokenizer.decode(ids, skip_special_tokens=False)


_WITHOUT_TORCH = """
import json, sys

class Refuse:  # every import of torch or transformers fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} imported by the device runtime")

sys.meta_path.insert(0, Refuse())
from PIL import Image
from edgekit.devices.runtime import Prompt, open_runtime

folder, spec = sys.argv[1], json.loads(sys.argv[2])
prompts = [Prompt(Image.open(p["image"]), p["text"]) for p in spec["prompts"]]
out = {}
for kind, options in spec["runtimes"].items():
    runtime = open_runtime(kind, folder, **options)
    answers = [runtime.generate(p, spec["max_new_tokens"]) for p in prompts]
    out[kind] = {"tokens": answers, "text": [runtime.decode(a) for a in answers]}
assert not {"torch", "transformers"} & set(sys.modules), "torch or transformers loaded"
print(json.dumps(out))
"""


def _reference(kind: str, files: dict, processor):
    """Runtime `kind` fed by `processor` (transformers' own, as every runtime was before the device processor)."""
    if kind == "onnx":
        return OnnxRuntime(files["onnx_dir"], processor)
    if kind == "gguf":
        return LlamaCppRuntime(files["lm_gguf"], files["mmproj_gguf"], processor, **LLAMA)
    if kind == "hybrid":
        return HybridRuntime(files["onnx_dir"], files["lm_gguf"], processor, **LLAMA)
    return OrtGenaiRuntime(files["genai_dir"], processor)


def test_device_runtimes_answer_without_torch_as_before(f32, tmp_path):
    """Each device runtime in a process where torch and transformers cannot load gives, token for token, what it
    gave fed by transformers' processor; fp32 ONNX and the hybrid also equal PyTorch up to a near tie."""
    loaded, folder = f32
    prompts = []
    for i, prompt in enumerate(PROMPTS):  # PNG: lossless, so both processes see the same pixels
        prompt.image.save(tmp_path / f"{i}.png")
        prompts.append({"image": str(tmp_path / f"{i}.png"), "text": prompt.text})
    spec = {"prompts": prompts, "runtimes": OPTIONS, "max_new_tokens": MAX_NEW_TOKENS}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, str(folder), json.dumps(spec)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    device = json.loads(done.stdout.strip().splitlines()[-1])

    images = [Prompt(Image.open(p["image"]), p["text"]) for p in prompts]
    hf = AutoProcessor.from_pretrained(export_files("onnx", folder)["processor_dir"])
    torch_rt = TorchRuntime(loaded, K)
    pytorch = [until_eos(torch_rt.generate(p, MAX_NEW_TOKENS), torch_rt.eos) for p in images]
    steps = [_greedy_steps(torch_rt, p) for p in images]
    assert len({tuple(t) for t in pytorch}) >= 4  # the answers depend on the prompt
    for kind in DEVICE_KINDS:
        files = export_files(kind, folder)
        runtime = _reference(kind, files, hf)
        want = [runtime.generate(p, MAX_NEW_TOKENS) for p in images]
        got = device[kind]["tokens"]
        same = sum(g == w for g, w in zip(got, want))
        print(f"{kind} F32 without torch: {same}/{len(want)} prompts token-identical to the transformers-fed runtime")
        assert got == want and all(len(g) >= 1 for g in got), kind
        assert device[kind]["text"] == [runtime.decode(w) for w in want], kind
        if kind in ("onnx", "hybrid"):
            answers = [until_eos(g, torch_rt.eos) for g in got]
            assert all(a == t or _leaves_at_near_tie(a, s) for a, t, s in zip(answers, pytorch, steps)), kind


def _greedy_steps(torch_rt: TorchRuntime, prompt: Prompt) -> list[tuple[int, int, float]]:
    """PyTorch's greedy answer step by step: the chosen token, the runner-up and their logits' gap."""
    out = torch_rt.greedy(prompt, MAX_NEW_TOKENS, output_scores=True, return_dict_in_generate=True)
    tops = [scores[0].topk(2) for scores in out.scores]
    return [(int(t.indices[0]), int(t.indices[1]), float(t.values[0] - t.values[1])) for t in tops]


def _leaves_at_near_tie(answer: list[int], steps: list[tuple[int, int, float]]) -> bool:
    """The answer follows PyTorch's greedy one until a step where PyTorch's top two logits are a near tie, and takes
    the runner-up there: from then on both are greedy continuations of an equally likely token."""
    for token, (best, second, gap) in zip(answer, steps):
        if token != best:
            return token == second and gap < NEAR_TIE
    return False


_REFUSED = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(name)

sys.meta_path.insert(0, Refuse())
from edgekit.devices.runtime import open_processor
from edgekit.errors import UserError

try:
    open_processor(sys.argv[1])
except UserError as err:
    print(err)
"""


@pytest.mark.parametrize("family", ["llava_next", "mllama"])
def test_other_families_refused_on_a_device_in_one_line(tiny_checkpoints, family):
    """Without transformers (a device) a family the device processor does not handle is one line; with it (the
    build machine) transformers' processor takes over, so those builds still gate."""
    folder = tiny_checkpoints[family]
    with pytest.raises(UserError, match="handles LLaVA-1.5") as err:
        DeviceProcessor(folder)
    assert "\n" not in str(err.value)
    done = subprocess.run([sys.executable, "-c", _REFUSED, folder], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(err.value), done.stderr[-2000:]
    assert (
        type(open_processor(folder)).__name__
        == {"llava_next": "LlavaNextProcessor", "mllama": "MllamaProcessor"}[family]
    )
