"""Target profiles, manifest.json, the export stage and `edgekit targets` / `edgekit export` on tiny checkpoints.

Artifacts are checked with their own runtimes: onnxruntime runs the quantized graphs, gguf reads the GGUF metadata;
token parity of the runtimes is in test_runtimes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import gguf as gguf_lib
import numpy as np
import pytest
from conftest import processor_inputs
from test_cli_foundation import _assert_one_line_error, _run

from edgekit.cli import main
from edgekit.devices.onnx_runtime import OnnxVLM
from edgekit.devices.profiles import TargetProfile, list_profiles, load_profile
from edgekit.errors import UserError
from edgekit.export.artifacts import export_artifacts
from edgekit.export.gguf import CLIP_VISION_FEATURE_LAYER
from edgekit.export.manifest import FileEntry, file_entry, read_manifest, verify_hashes, write_manifest
from edgekit.export.onnx_format import DESCRIPTION_FILE
from edgekit.model.loading import load
from edgekit.model.surgery import num_exit_layers, set_exit_layer

K = 12


# --- profiles --------------------------------------------------------------------------------------------------------
def test_profiles_and_kinds():
    profiles = {p.name: p for p in list_profiles()}
    assert {"jetson-orin-nano", "jetson-agx-orin", "android-arm64"} <= set(profiles)
    for kind in ("jetson", "phone"):
        assert sum(p.default for p in profiles.values() if p.kind == kind) == 1, kind
    nano, agx, phone = load_profile("jetson"), load_profile("jetson-agx-orin"), load_profile("phone")
    assert nano.name == "jetson-orin-nano" and phone.name == "android-arm64"
    assert nano.memory_budget_bytes == 5_000_000_000 < agx.memory_budget_bytes
    assert (nano.onnx_quantization, nano.gguf_quantization) == ("fp16", "q4_k_m")
    assert (phone.onnx_quantization, phone.gguf_quantization) == ("int8_dynamic", "q4_0")
    assert "int4" in phone.onnx_options and phone.kind == "phone"
    assert nano.gates.asr > 0 and nano.onnx_opset >= 13
    with pytest.raises(dataclasses.FrozenInstanceError):
        nano.memory_budget_bytes = 1  # type: ignore[misc]


def test_unknown_and_malformed_profiles(tmp_path):
    with pytest.raises(UserError, match="unknown target 'tv'.*jetson, phone, .*jetson-orin-nano.*android-arm64"):
        load_profile("tv")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nkind = "jetson"\n')
    with pytest.raises(UserError, match="lacks the key"):
        load_profile(str(bad))
    text = (Path(load_profile("jetson").source)).read_text().replace('kind = "jetson"', 'kind = "toaster"')
    bad.write_text(text)
    with pytest.raises(UserError, match="kind 'toaster'"):
        load_profile(str(bad))
    with pytest.raises(UserError, match="no such target profile file"):
        load_profile(str(tmp_path / "missing.toml"))


# --- manifest --------------------------------------------------------------------------------------------------------
def test_manifest_round_trip_and_verification(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.onnx").write_bytes(b"graph")
    (tmp_path / "b.gguf").write_bytes(b"weights" * 10)
    entries = [
        file_entry(tmp_path, "sub/a.onnx", "onnx", "fp16"),
        file_entry(tmp_path, tmp_path / "b.gguf", "gguf", "q4_0"),
    ]  # absolute paths work too
    write_manifest(
        tmp_path,
        exit_layer=7,
        target="android-arm64",
        source_model="me/model",
        revision=None,
        files=entries,
        extra={"notes": ["x"]},
    )
    m = read_manifest(tmp_path)
    assert (m["exit_layer"], m["target"], m["source_model"], m["revision"]) == (7, "android-arm64", "me/model", None)
    assert m["edgekit_version"] and m["notes"] == ["x"]
    assert m["files"] == (FileEntry("b.gguf", entries[1].sha256, 70, "gguf", "q4_0"), entries[0])
    assert entries[0].sha256 == hashlib.sha256(b"graph").hexdigest() and entries[0].bytes == 5
    assert verify_hashes(tmp_path) == []

    (tmp_path / "b.gguf").write_bytes(b"weightz" * 10)  # same size, other bytes
    (tmp_path / "sub" / "a.onnx").unlink()
    (tmp_path / "stray.txt").write_text("?")
    problems = verify_hashes(tmp_path)
    assert problems == [
        "b.gguf: sha256 differs from the manifest",
        "sub/a.onnx: missing",
        "stray.txt: not listed in the manifest",
    ], problems
    (tmp_path / "b.gguf").write_bytes(b"short")
    assert "b.gguf: 5 bytes, manifest says 70" in verify_hashes(tmp_path)
    assert verify_hashes(tmp_path / "sub") == [f"{tmp_path / 'sub'}: no manifest.json"]
    with pytest.raises(ValueError, match="clash"):
        write_manifest(
            tmp_path, exit_layer=1, target="t", source_model="m", revision=None, files=[], extra={"target": "other"}
        )


# --- the export stage ------------------------------------------------------------------------------------------------
def _field(path, key):
    return gguf_lib.GGUFReader(path).fields[key].contents()


def _cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def jetson_export(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "jetson"
    argv = ["export", tiny_checkpoints["llava"], "--exit-layer", str(K), "--target", "jetson", "-o", str(out)]
    assert main([*argv, "--formats", "onnx,gguf,mmproj"]) == 0  # the mmproj opted in
    return out


def test_cli_export_jetson(jetson_export, tiny_checkpoints):
    out = jetson_export
    assert verify_hashes(out) == []
    m = read_manifest(out)
    assert (m["exit_layer"], m["target"], m["source_model"]) == (K, "jetson-orin-nano", tiny_checkpoints["llava"])
    by_path = {e.path: e for e in m["files"]}
    onnx_dir, lm, mmproj = (m["artifacts"][key] for key in ("onnx_dir", "lm_gguf", "mmproj_gguf"))
    assert (onnx_dir, lm, mmproj) == (f"onnx-k{K}-fp16", "lm-q4_k_m.gguf", f"mmproj-k{K}-f16.gguf")
    assert by_path[f"{onnx_dir}/vision_encoder.onnx"].quantization == "fp16" and by_path[lm].format == "gguf"
    assert not [p for p in out.rglob("*") if ".work" in p.parts or p.name.endswith(".partial")]
    assert m["memory"]["largest_set_bytes"] == max(s["bytes"] for s in m["memory"]["sets"].values())
    assert set(m["memory"]["sets"]) == {"onnx", "gguf", "hybrid", "ortgenai"}

    # GGUF: K-quant recipe from llama.cpp's quantizer; the mmproj runs exactly k blocks and taps block k
    assert _field(out / lm, gguf_lib.Keys.General.FILE_TYPE) == gguf_lib.LlamaFileType.MOSTLY_Q4_K_M
    assert _field(out / mmproj, gguf_lib.Keys.ClipVision.BLOCK_COUNT) == K
    assert _field(out / mmproj, CLIP_VISION_FEATURE_LAYER) == [K]

    # ONNX: fp16 graphs (norms kept fp32) whose image features stay close to PyTorch's at exit k, and which decode
    desc = json.loads((out / onnx_dir / DESCRIPTION_FILE).read_text())
    assert desc["quantization"]["scheme"] == "fp16" and desc["exit_layer"] == K
    loaded = load(tiny_checkpoints["llava"], dtype="float32")
    inputs = processor_inputs(loaded.processor)
    set_exit_layer(loaded.model, K)
    want = loaded.family.features_per_layer(loaded.model, inputs, [K])[K].detach().numpy()
    vlm = OnnxVLM(out / onnx_dir)
    assert _cosine(vlm.image_features(inputs), want) >= 0.999
    assert vlm.generate(inputs, 4, eos_token_ids=()).shape == (1, 4)


def test_export_phone_profile_and_llava_next(tiny_checkpoints, tmp_path):
    loaded = load(tiny_checkpoints["llava"], dtype="float32")
    phone = load_profile("phone")
    result = export_artifacts(loaded, 5, phone, tmp_path / "phone", nthread=2)
    assert result.onnx_dir == "onnx-k5-int8_dynamic" and result.lm_gguf == "lm-q4_0.gguf"
    assert _field(result.folder / result.lm_gguf, gguf_lib.Keys.General.FILE_TYPE) == gguf_lib.LlamaFileType.MOSTLY_Q4_0
    assert num_exit_layers(loaded.model) == 24 and len(loaded.model.model.vision_tower.encoder.layers) == 5
    int4 = export_artifacts(loaded, 5, phone, tmp_path / "int4", formats=("onnx",), onnx_quantization="int4")
    assert int4.lm_gguf is None and [s.name for s in int4.runtime_sets] == ["onnx", "ortgenai"]
    assert json.loads((int4.folder / int4.onnx_dir / DESCRIPTION_FILE).read_text())["quantization"]["scheme"] == "int4"

    # LLaVA-NeXT: LM GGUF, no mmproj (anyres is not in the mmproj writer): the hybrid set runs it
    nxt = load(tiny_checkpoints["llava_next"], dtype="float32")
    with pytest.raises(UserError, match="no mmproj for LLaVA-NeXT"):
        export_artifacts(nxt, K, load_profile("jetson-agx-orin"), tmp_path / "x", ("onnx", "gguf", "mmproj"))
    result = export_artifacts(nxt, K, load_profile("jetson-agx-orin"), tmp_path / "next", nthread=2)
    assert result.mmproj_gguf is None and result.lm_gguf
    assert {s.name for s in result.runtime_sets} == {"onnx", "hybrid"}  # no ortgenai: the packing is host-side
    assert "anyres" in read_manifest(result.folder)["unsupported_runtimes"]["ortgenai"]
    assert any(p.endswith("image_newline.npy") for s in result.runtime_sets if s.name == "hybrid" for p in s.paths)
    assert verify_hashes(result.folder) == []


# --- the CLI ---------------------------------------------------------------------------------------------------------
def test_targets_table(capsys):
    code, out, _ = _run(capsys, "targets")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["target", "kind", "memory", "budget"]
    assert any(line.startswith("jetson-orin-nano (default)") and "5.00 GB" in line for line in lines)
    phone = [line for line in lines if line.startswith("android-arm64 (default)")]
    assert len(phone) == 1 and "q4_0" in phone[0] and "int8_dynamic*/int4" in phone[0]


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder left


@pytest.mark.parametrize(
    "family, extra, fragments",
    [
        ("llava", ["--target", "tv"], ["unknown target 'tv'", "jetson", "phone", "android-arm64"]),
        ("llava", ["--target", "jetson", "--formats", "onnx,tflite"], ["unknown format tflite", "onnx, gguf"]),
        ("llava", ["--target", "jetson", "--formats", ","], ["unknown format"]),
        ("mllama", ["--target", "jetson"], ["llama.cpp has no Llama 3.2 Vision support; use --formats onnx"]),
        (
            "llava",
            ["--target", "phone", "--onnx-quantization", "int8_qdq"],
            ["android-arm64", "int8_dynamic, int4", "not int8_qdq"],
        ),
    ],
)
def test_export_bad_target_and_formats(capsys, tiny_checkpoints, tmp_path, family, extra, fragments):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", tiny_checkpoints[family], "--exit-layer", "3", "-o", str(out), *extra)
    _assert_one_line_error(code, err, *fragments)
    _no_output(out)


@pytest.mark.parametrize(
    "family, k, fragments",
    [
        ("llava", "0", ["exit layer 0", "1..24"]),
        ("llava", "25", ["exit layer 25", "1..24"]),
        ("mllama", "33", ["exit layer 33", "1..32"]),
        ("llava", "x", ["integer", "'x'"]),
    ],
)
def test_export_bad_exit_layer(capsys, tiny_checkpoints, tmp_path, family, k, fragments):
    out = tmp_path / "out"
    code, _, err = _run(
        capsys,
        "export",
        tiny_checkpoints[family],
        "--exit-layer",
        k,
        "--target",
        "phone",
        "--formats",
        "onnx",
        "-o",
        str(out),
    )
    _assert_one_line_error(code, err, *fragments)
    _no_output(out)


def test_export_unwritable_or_occupied_output(capsys, tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["llava"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, _, err = _run(capsys, "export", model, "--exit-layer", "3", "--target", "jetson", "-o", str(a_file))
    _assert_one_line_error(code, err, "exists and is not a folder")
    code, _, err = _run(capsys, "export", model, "--exit-layer", "3", "--target", "jetson", "-o", str(a_file / "out"))
    _assert_one_line_error(code, err, "cannot write here", "not a folder")
    assert a_file.read_text() == "x"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "export", model, "--exit-layer", "3", "--target", "jetson", "-o", str(occupied))
    _assert_one_line_error(code, err, "not empty", "--overwrite")
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_export_over_budget_writes_nothing(capsys, tiny_checkpoints, tmp_path):
    text = Path(load_profile("phone").source).read_text()
    small = tmp_path / "tiny-phone.toml"
    small.write_text(
        text.replace("memory_budget_bytes = 4_000_000_000", "memory_budget_bytes = 100_000").replace(
            'name = "android-arm64"', 'name = "tiny-phone"'
        )
    )
    assert load_profile(str(small)) == dataclasses.replace(
        load_profile("phone"), name="tiny-phone", memory_budget_bytes=100_000, source=str(small)
    )
    out = tmp_path / "out"
    code, _, err = _run(
        capsys, "export", tiny_checkpoints["llava"], "--exit-layer", "3", "--target", str(small), "-o", str(out)
    )
    _assert_one_line_error(code, err, "tiny-phone", "memory budget is 100.00 KB", "needs")
    _no_output(out)


def test_target_profile_is_checked():
    base = load_profile("jetson")
    with pytest.raises(UserError, match="not among its onnx_options"):
        dataclasses.replace(base, onnx_quantization="int8_dynamic")
    with pytest.raises(UserError, match="GGUF quantization 'q3'"):
        TargetProfile(**{**dataclasses.asdict(base), "gates": base.gates, "gguf_quantization": "q3"})


def test_export_into_a_relative_folder(tiny_checkpoints, tmp_path, monkeypatch):
    """Output paths relative to the working folder (as `make demo` passes them) reach the manifest intact."""
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "export",
                tiny_checkpoints["llava"],
                "--exit-layer",
                "12",
                "--target",
                "jetson",
                "--formats",
                "onnx",
                "-o",
                "rel/out",
            ]
        )
        == 0
    )
    assert verify_hashes(tmp_path / "rel" / "out") == []
