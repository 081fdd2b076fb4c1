"""Checkpoints at the published dimensions (edgekit.model.real_sizes): the parameter counts of the real models, the
tensor names save_pretrained writes, and a sharded write that loads and truncates like a hub download."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from edgekit.cli import main
from edgekit.model.loading import SAFETENSORS_INDEX, check_weight_files
from edgekit.model.real_sizes import REAL_MODELS, real_config, tensor_layout, write_real_checkpoint

# The parameter counts of the hub repos (llava-hf/llava-1.5-7b-hf 7.06B, llava-hf/llava-v1.6-mistral-7b-hf 7.57B,
# meta-llama/Llama-3.2-11B-Vision-Instruct 10.7B)
PUBLISHED = {"llava-1.5-7b": 7.06e9, "llava-v1.6-mistral-7b": 7.57e9, "llama-3.2-11b-vision": 10.67e9}


def _shape_of_names(names) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


@pytest.mark.parametrize("name", REAL_MODELS)
def test_layout_has_the_published_size_and_the_saved_names(name, tiny_checkpoints):
    config, _ = real_config(name)
    layout = tensor_layout(config)
    params = sum(int(torch.Size(shape).numel()) for _, shape in layout)
    assert abs(params - PUBLISHED[name]) / PUBLISHED[name] < 0.005, params
    tiny = tiny_checkpoints[REAL_MODELS[name].family]
    with safe_open(f"{tiny}/model.safetensors", "pt") as f:
        saved = list(f.keys())
    assert _shape_of_names(n for n, _ in layout) == _shape_of_names(saved)


def test_a_sharded_write_loads_and_truncates(tmp_path, capsys):
    out = write_real_checkpoint("llava-1.5-7b", tmp_path / "llava", lm_layers=1, shard_bytes=300_000_000, log=print)
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    check_weight_files(out)  # every shard whole, by its own header
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 4096 and config["vision_config"]["image_size"] == 336
    assert main(["truncate", str(out), "--exit-layer", "12", "-o", str(tmp_path / "cut"), "--dtype", "float16"]) == 0
    assert "vision tower cut to 12 of 24 blocks" in capsys.readouterr().out


def test_an_export_the_machine_cannot_hold_is_refused_before_any_weight(tmp_path, capsys, monkeypatch):
    """From the config alone (no weights exist here), in seconds, with nothing written: LLaVA-1.5-7B widths with 4
    language-model layers, exported for the phone (int8 ONNX: the quantizers read float32 graphs), need about 10 GiB;
    a machine with 8 GiB available is told so."""
    from edgekit.export import estimates

    config, _ = real_config("llava-1.5-7b", lm_layers=4)
    config.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(estimates, "available_memory", lambda: 8 << 30)
    out = tmp_path / "out"
    code = main(["export", str(tmp_path / "model"), "--exit-layer", "12", "--target", "phone", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "8.0 GiB available" in err[0], err
    assert "holds the model in float32" in err[0] and "needs about 10.4 GiB" in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_real_width_export_answers_in_every_onnx_runtime(tmp_path):
    """LLaVA-1.5-7B widths, 4 language-model layers (1.4B parameters): the jetson export writes the decoder with its
    weights in decoder_model_merged.onnx_data (past 2 GiB in float32), and ONNX Runtime, onnxruntime-genai and the
    hybrid each answer a prompt from the folder."""
    from PIL import Image

    from edgekit.devices.runtime import Prompt, open_runtime
    from edgekit.export.manifest import verify_hashes

    model = write_real_checkpoint("llava-1.5-7b", tmp_path / "model", lm_layers=4)
    out = tmp_path / "export"
    assert main(["export", str(model), "--exit-layer", "12", "--target", "jetson", "-o", str(out)]) == 0
    assert (out / "onnx-k12-fp16" / "decoder_model_merged.onnx_data").stat().st_size > 1_500_000_000
    assert verify_hashes(out) == []
    prompt = Prompt(Image.new("RGB", (400, 300), (90, 120, 200)), "what colour is the picture?")
    for kind in ("onnx", "ortgenai", "hybrid"):
        tokens = open_runtime(kind, out, **({"n_ctx": 1024} if kind == "hybrid" else {})).generate(prompt, 4)
        assert 1 <= len(tokens) <= 4, kind


def test_artifacts_too_big_for_the_target_are_refused_from_the_config(tmp_path, capsys):
    """LLaVA-1.5-7B for the phone (4 GB budget): its int8 ONNX set is about 6.9 GB, its int4 one 4.3 GB, and even the
    hybrid's int8 vision graph beside the Q4_0 GGUF is just over (4.0014 GB estimated; 4.0035 GB written), so the
    export is refused before any weight is read, and the line says what would fit: the language-model GGUF alone
    (about 3.8 GB), or the 12 GB phone's int4."""
    config, _ = real_config("llava-1.5-7b")
    config.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = main(["export", str(tmp_path / "model"), "--exit-layer", "12", "--target", "phone", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists(), err
    assert "the onnx set needs about 6.92 GB (int8_dynamic)" in err[0] and "budget is 4.00 GB" in err[0], err
    assert "--formats gguf would fit (about 3.82 GB)" in err[0], err
    assert "target android-arm64-12gb would fit (int4, about 4.33 GB)" in err[0], err


def test_a_target_takes_the_next_onnx_scheme_that_fits_its_budget():
    """LLaVA-1.5-7B for the Jetson Orin Nano (5 GB): its fp16 (13.8 GB) and int8 (7.3 GB) ONNX sets are over the
    budget, so the target's default becomes int4 (4-bit weights with a float16 scale per 32: 4.33 GB, and 4.42 GB
    for the hybrid's fp16 vision graph + the Q4_K_M GGUF), and the line says why; fp16 asked for by name is refused
    instead. The 4-layer model's fp16 set fits and stays fp16."""
    from edgekit.devices.profiles import load_profile
    from edgekit.errors import UserError
    from edgekit.export.estimates import OnnxPlan, check_export, fit_to_budget

    config, _ = real_config("llava-1.5-7b")
    nano, formats = load_profile("jetson"), ("onnx", "gguf")
    plan = fit_to_budget(config, 12, nano, formats)
    assert plan.scheme == "int4" and plan.decoder, plan
    assert plan.why == (
        "target jetson-orin-nano: with fp16 ONNX the largest runtime set would need about 13.82 GB, over the "
        "5.00 GB budget; exporting int4 (largest set about 4.42 GB)"
    )
    check_export(config, 12, nano, formats, plan)
    with pytest.raises(UserError, match="the onnx set needs about 13.82 GB"):
        check_export(config, 12, nano, formats, OnnxPlan("fp16"))
    assert fit_to_budget(real_config("llava-1.5-7b", lm_layers=4)[0], 12, nano, formats) == OnnxPlan("fp16")


def test_a_phone_that_no_onnx_decoder_fits_gets_the_hybrid():
    """LLaVA-1.5-7B for a phone with 4.1 GB for the app: no ONNX decoder fits (int8 6.92 GB, int4 4.33 GB), but the
    int8 vision graph beside the Q4_0 language model GGUF does (4.00 GB), so the export writes that and says so; the
    memory it needs is the model as saved, not a float32 copy."""
    from dataclasses import replace

    from edgekit.devices.profiles import load_profile
    from edgekit.export.estimates import check_export, export_needs, fit_to_budget

    config, _ = real_config("llava-1.5-7b")
    phone, formats = replace(load_profile("phone"), memory_budget_bytes=4_100_000_000), ("onnx", "gguf")
    plan = fit_to_budget(config, 12, phone, formats)
    assert plan.scheme == "int8_dynamic" and not plan.decoder, plan
    assert plan.why == (
        "target android-arm64: with int8_dynamic ONNX the largest runtime set would need about 6.92 GB, over the "
        "4.10 GB budget, and with int4 about 4.33 GB; exporting the int8_dynamic ONNX vision graph alone, for the "
        "hybrid runtime with the q4_0 language model GGUF (about 4.00 GB)"
    )
    needs = export_needs(config, 12, phone, formats, plan.scheme, plan.decoder)
    assert set(needs.sets) == {"gguf", "hybrid"} and needs.memory_why == "holds the model as saved"
    assert needs.memory < 1.3 * 2 * 7.06e9
    check_export(config, 12, phone, formats, plan)
