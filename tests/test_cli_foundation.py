"""`edgekit inspect` and `edgekit truncate`: what they print, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText

from edgekit import commands, outputs
from edgekit.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def unsupported_model(tmp_path) -> Path:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    return folder


@pytest.mark.parametrize(
    "k, fragments",
    [
        ("0", ["exit layer 0", "1..24"]),
        ("25", ["exit layer 25", "1..24"]),
        ("twelve", ["integer", "'twelve'"]),
        ("3.5", ["integer", "'3.5'"]),
    ],
)
def test_bad_exit_layer(capsys, tiny_checkpoints, tmp_path, k, fragments):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "truncate", tiny_checkpoints["llava"], "--exit-layer", k, "-o", str(out))
    _assert_one_line_error(code, err, *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "--exit-layer", "25"],
        ["truncate", "--exit-layer", "25", "-o", "OUT"],
        ["export", "--exit-layer", "25", "--target", "jetson", "-o", "OUT"],
        ["scan", "--layers", "1-25", "-o", "OUT"],
        ["align", "--exit-layer", "25", "-o", "OUT"],
    ],
)
def test_omitted_model_is_the_demo_model_checked_before_training(capsys, tmp_path, monkeypatch, argv):
    """Every command that takes MODEL falls back to the demo model; a bad layer fails before minutes of training."""
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, _, err = _run(capsys, *[str(out) if a == "OUT" else a for a in argv])
    _assert_one_line_error(code, err, "25", "1..24")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_bad_model_paths(capsys, tmp_path, unsupported_model):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "truncate", str(tmp_path / "missing"), "--exit-layer", "3", "-o", str(out))
    _assert_one_line_error(code, err, "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "truncate", str(empty), "--exit-layer", "3", "-o", str(out))
    _assert_one_line_error(code, err, "no config.json")
    code, _, err = _run(capsys, "inspect", str(unsupported_model))
    _assert_one_line_error(code, err, "'bert'", "LLaVA-1.5", "LLaVA-NeXT", "Llama 3.2 Vision")
    (unsupported_model / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    code, _, err = _run(capsys, "truncate", str(unsupported_model), "--exit-layer", "3", "-o", str(out))
    _assert_one_line_error(code, err, "'not_a_model'", "supported families")
    assert not out.exists()


def test_cut_missing_or_corrupt_weight_files(capsys, tiny_checkpoints, tmp_path):
    """A partial download is one line naming the file, before any weight is read; a whole sharded copy loads."""
    sharded = tmp_path / "sharded"
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["llava"])
    model.save_pretrained(sharded, max_shard_size="600KB")
    for name in Path(tiny_checkpoints["llava"]).iterdir():
        if not name.name.startswith("model") and name.name != "config.json":
            shutil.copy(name, sharded / name.name)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    argv = ("truncate", str(sharded), "--exit-layer", "3", "-o", str(out))
    assert _run(capsys, *argv)[0] == 0
    shutil.rmtree(out)

    whole = shards[-1].read_bytes()
    shards[-1].write_bytes(whole[: len(whole) // 2])
    code, _, err = _run(capsys, *argv)
    _assert_one_line_error(code, err, shards[-1].name, "cut short or corrupt")
    shards[-1].write_bytes(b"\xff" * 64)
    code, _, err = _run(capsys, *argv)
    _assert_one_line_error(code, err, shards[-1].name, "not a readable safetensors file")
    shards[-1].unlink()
    code, _, err = _run(capsys, *argv)
    _assert_one_line_error(code, err, shards[-1].name, "missing")
    assert not out.exists()


def test_existing_output_needs_overwrite(capsys, tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "truncate", tiny_checkpoints["llava"], "--exit-layer", "3", "-o", str(out))
    _assert_one_line_error(code, err, "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, stdout, _ = _run(
        capsys, "truncate", tiny_checkpoints["llava"], "--exit-layer", "3", "-o", str(out), "--overwrite"
    )
    assert code == 0 and "cut to 3 of 24" in stdout
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temp folder left behind


@pytest.mark.parametrize("family", ["llava", "llava_next", "mllama"])
def test_inspect_shows_the_saving(capsys, tiny_checkpoints, tmp_path, family):
    code, stdout, _ = _run(capsys, "inspect", tiny_checkpoints[family], "--exit-layer", "5", "--json")
    assert code == 0
    report = json.loads(stdout)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[family])
    assert report["parts"][-1]["params"] == sum(p.numel() for p in model.parameters())
    code, _, _ = _run(capsys, "truncate", tiny_checkpoints[family], "--exit-layer", "5", "-o", str(tmp_path / "cut"))
    cut = AutoModelForImageTextToText.from_pretrained(tmp_path / "cut")
    assert report["saved_params"] == report["parts"][-1]["params"] - sum(p.numel() for p in cut.parameters()) > 0
    code, text, _ = _run(capsys, "inspect", tiny_checkpoints[family], "--exit-layer", "5")
    assert f"{report['saved_params']:,} params" in text


def test_console_script_exit_code(tiny_checkpoints, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgekit.cli",
            "truncate",
            tiny_checkpoints["llava"],
            "--exit-layer",
            "99",
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "edgekit: error: exit layer 99 is outside 1..24 (the vision tower has 24 layers)"


def test_a_terminated_export_leaves_nothing_half_written(tiny_checkpoints, tmp_path):
    """SIGTERM (a job scheduler's timeout, `kill`) unwinds like Ctrl-C: the temporary folder is removed."""
    out = tmp_path / "out"
    argv = ["export", tiny_checkpoints["llava"], "--exit-layer", "3", "--target", "jetson", "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", *argv], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.*")), "the export never started writing"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)  # reads while waiting, so a full pipe cannot stall the child
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # the child's own account names the path that misfired
    assert list(tmp_path.iterdir()) == []


def test_a_swallowed_sigterm_still_commits_nothing(tmp_path, monkeypatch):
    """A library's finalizer or broad `except` can swallow the SystemExit the SIGTERM handler raises; the output's
    commit point raises it again, so the run still ends with 143 and nothing is written."""
    monkeypatch.setattr(outputs, "_terminated_by", 0)  # restored after the test: the flag is process-wide
    with pytest.raises(SystemExit) as stopped:
        with outputs.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            try:
                outputs.terminate(signal.SIGTERM)
            except BaseException:  # what a finalizer does with it
                pass
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_a_sigterm_a_library_turned_into_another_error_still_ends_with_its_code(monkeypatch):
    """safetensors' Rust reader reports a Python exception raised inside it (the handler's SystemExit) as a
    ValueError; the run must still end with 143, not a traceback and exit code 1."""
    monkeypatch.setattr(outputs, "_terminated_by", 0)

    def reads_weights(args):
        try:
            outputs.terminate(signal.SIGTERM)
        except SystemExit as err:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from err

    monkeypatch.setattr(commands, "cmd_targets", reads_weights)
    with pytest.raises(SystemExit) as stopped:
        main(["targets"])
    assert stopped.value.code == 128 + signal.SIGTERM
