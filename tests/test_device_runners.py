"""Bundles and device runners, on real transports: the bundle answering from its own files with torch and
transformers unimportable; `edgekit verify` and `edgekit bench` over ssh to an OpenSSH server this module starts on
127.0.0.1 (a key pair and host key of its own, stopped at the end); adb up to the point a phone is needed; and every
way a device run goes wrong: one line, exit code 2, nothing left half-written on either side."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import GENEROUS_GATES, build_argv, build_config, full_precision_profile

from edgekit.build.devices import DEVICES_DIR
from edgekit.build.stages import Stage
from edgekit.cli import main
from edgekit.devices.bundle import DEVICE_MODULES, make_bundle, read_bundle
from edgekit.devices.jobs import run_job
from edgekit.devices.on_device import BUNDLE_FILE
from edgekit.devices.runners import LocalDevice, SshDevice, parse_facts
from edgekit.devices.runtime import Prompt, open_runtime
from edgekit.export.artifacts import export_artifacts
from edgekit.model.loading import load
from edgekit.safety.suite import builtin_suite

SSHD = "/usr/sbin/sshd"
LLAMA = {"n_threads": 1, "n_ctx": 256}
OPTIONS = {"gguf": LLAMA, "hybrid": LLAMA}
KINDS = ("onnx", "gguf", "hybrid", "ortgenai")
PROMPTS = [Prompt(item.image(), item.prompt) for item in builtin_suite().select("eval", limit_per_kind=2)]

# Loaded first in every Python the device runs: torch and transformers refuse to import, and at exit the process
# writes down where each edgekit module it used came from.
_GUARD = """
import atexit, os, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is not on the device")

sys.meta_path.insert(0, Refuse())

def _record():
    with open(os.environ["EDGEKIT_TEST_MODULES"], "a") as f:
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] in ("edgekit", "__main__"):
                f.write(f"{name} {getattr(module, '__file__', None)}\\n")

atexit.register(_record)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def export(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny LLaVA exported at F32 for every runtime."""
    loaded = load(tiny_checkpoints["llava"], dtype="float32")
    return export_artifacts(loaded, 12, full_precision_profile(), tmp_path_factory.mktemp("export") / "out").folder


@pytest.fixture(scope="module")
def bundle(export, tmp_path_factory) -> Path:
    return make_bundle(export, tmp_path_factory.mktemp("bundle") / "bundle", log=lambda line: None)


@pytest.fixture(scope="module")
def built(tiny_checkpoints, tmp_path_factory) -> Path:
    """A finished tiny build whose gate passes (generous limits), with every runtime, for verify on a device."""
    root = tmp_path_factory.mktemp("build")
    argv = build_argv(tiny_checkpoints["llava"], root / "out", build_config(root, GENEROUS_GATES))
    assert main([*argv, "--formats", "onnx,gguf,mmproj"]) == 0  # every runtime, llama.cpp's own pipeline too
    return root / "out"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """OpenSSH's server on 127.0.0.1, keys only, with this module's own host key and client keys."""
    if not Path(SSHD).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{SSHD} missing: .ci/run installs openssh-server")
        pytest.skip(f"{SSHD} missing (apt install openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host", "user", "stranger"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPidFile {d / 'sshd.pid'}\n"
    )
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host.pub').read_text()}")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    with open(d / "sshd.log", "w") as log:
        server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert server.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
            time.sleep(0.1)

        def options(key: str = "user") -> str:
            return (
                f"-F /dev/null -i {d / key} -o IdentitiesOnly=yes -o UserKnownHostsFile={d / 'known_hosts'} "
                "-o StrictHostKeyChecking=yes"
            )

        yield SimpleNamespace(url=f"ssh://{getpass.getuser()}@127.0.0.1:{port}", port=port, options=options)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _device_args(url: str, remote: Path) -> list[str]:
    return ["--device", url, "--python", sys.executable, "--remote-dir", str(remote)]


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("edgekit: error: "), err
    assert all(n in err[-1] for n in needles), err[-1]
    return err[-1]


def test_bundle_answers_from_its_own_files_without_torch(export, bundle, tmp_path, monkeypatch):
    """The bundle on a local device, in Pythons where torch and transformers cannot load: every runtime answers
    token for token as it does in this process, and every edgekit module the device used came from the bundle."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_GUARD)
    monkeypatch.setenv("PYTHONPATH", str(guard))
    monkeypatch.setenv("EDGEKIT_TEST_MODULES", str(tmp_path / "modules.txt"))
    device = LocalDevice(sys.executable, str(tmp_path / "device"))
    description = read_bundle(bundle)
    got = run_job(device, bundle, description, "answer", KINDS, PROMPTS, 12, options=OPTIONS, log=print)["runtimes"]
    for kind in KINDS:
        assert "error" not in got[kind], got[kind]
        runtime = open_runtime(kind, export, **OPTIONS.get(kind, {}))
        want = [runtime.generate(p, 12) for p in PROMPTS]
        assert [a["tokens"] for a in got[kind]["answers"]] == want, kind
        assert [a["text"] for a in got[kind]["answers"]] == [runtime.decode(w) for w in want], kind
    on_device = (tmp_path / "device" / "bundles" / description["id"][:16]).resolve()
    used = dict(line.split(" ", 1) for line in (tmp_path / "modules.txt").read_text().splitlines())
    assert Path(used.pop("__main__")).resolve() == on_device / "edgekit" / "devices" / "on_device.py"
    assert set(used) <= set(DEVICE_MODULES) and "edgekit.devices.runtime" in used
    assert all(Path(file).resolve().is_relative_to(on_device) for file in used.values()), used
    assert not list((tmp_path / "device" / "jobs").iterdir())  # the job folder is removed after the run


def test_verify_and_bench_over_ssh(built, sshd, tmp_path, monkeypatch, capsys):
    """`edgekit verify --device ssh://...` answers the eval split on the device as the build machine did, the gate
    passes there, and `edgekit bench --device` measures every runtime there; both land in the build's report and
    manifest (`edgekit verify` without a device still passes)."""
    monkeypatch.setenv("EDGEKIT_SSH_OPTIONS", sshd.options())
    remote = tmp_path / "remote"
    assert main(["verify", str(built), *_device_args(sshd.url, remote)]) == 0
    label = SshDevice(getpass.getuser(), "127.0.0.1", sshd.port, None, None).label
    results = built / DEVICES_DIR / label
    sets = json.loads((built / Stage.EXPORT / "manifest.json").read_text())["memory"]["sets"]
    for kind in sets:
        here = [json.loads(line) for line in (built / Stage.SAFETY / f"answers_{kind}.jsonl").read_text().splitlines()]
        there = [json.loads(line) for line in (results / f"answers_{kind}.jsonl").read_text().splitlines()]
        assert there == here, kind  # same answers, same judge calls
    safety = json.loads((results / "safety.json").read_text())
    assert {v["artifact"] for v in safety["verdicts"]} == set(sets) and all(v["passed"] for v in safety["verdicts"])

    monkeypatch.chdir(built.parent)  # a relative DIR, as people type it
    assert main(["bench", built.name, *_device_args(sshd.url, remote), "--prompts", "1", "--max-new-tokens", "4"]) == 0
    bench = json.loads((results / "bench.json").read_text())
    assert bench["device"]["device"] == label and bench["device"]["cores"] >= 1
    for kind in sets:
        row = bench["rows"][kind]
        assert row["first_token_ms"] > 0 and row["decode_tok_s"] > 0 and row["peak_rss_mib"] > row["baseline_rss_mib"]
    assert (results / "safety.json").is_file()  # the bench kept the gate's results beside it
    report = (built / "report.md").read_text()
    assert f"## On device `{label}`" in report and "Gate on the device: **PASSED**" in report
    assert len(list((remote / "bundles").iterdir())) == 1  # copied once, reused by the bench
    capsys.readouterr()
    assert main(["verify", str(built)]) == 0  # the manifest covers the device results


def test_unreachable_host_and_refused_key(bundle, sshd, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEKIT_SSH_OPTIONS", sshd.options())
    nobody = f"ssh://{getpass.getuser()}@127.0.0.1:{_free_port()}"
    _one_line_error(capsys, main(["bench", str(bundle), *_device_args(nobody, tmp_path)]), "Connection refused")
    monkeypatch.setenv("EDGEKIT_SSH_OPTIONS", sshd.options("stranger"))
    _one_line_error(capsys, main(["bench", str(bundle), *_device_args(sshd.url, tmp_path)]), "Permission denied")
    assert not list(tmp_path.iterdir())


def test_device_out_of_space(bundle, sshd, tmp_path, monkeypatch, capsys):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setenv("EDGEKIT_SSH_OPTIONS", sshd.options())
        code = main(["bench", str(bundle), *_device_args(sshd.url, small / "edgekit")])
        _one_line_error(capsys, code, "bundle needs", "free")
        assert [p.name for p in (small / "edgekit").iterdir()] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_bundle_from_another_edgekit_or_cut_short(bundle, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    description = json.loads((other / BUNDLE_FILE).read_text())
    (other / BUNDLE_FILE).write_text(json.dumps({**description, "edgekit_source": "0" * 64}))
    local = ["--device", "local", "--remote-dir", str(tmp_path / "device")]
    _one_line_error(capsys, main(["bench", str(other), *local]), "made by another edgekit")
    cut = tmp_path / "cut"
    shutil.copytree(bundle, cut)
    victim = next(f for f in description["files"] if f["path"].endswith(".onnx"))
    (cut / victim["path"]).write_bytes((cut / victim["path"]).read_bytes()[:100])
    _one_line_error(capsys, main(["bench", str(cut), *local]), "partial bundle", victim["path"])
    assert not (tmp_path / "device").exists()


def test_cut_copy_on_the_device_is_refused_there(bundle, tmp_path, capsys):
    """A bundle folder on the device that lost a file (a full disk, a user's rm) stops the runner in one line."""
    device = LocalDevice(sys.executable, str(tmp_path / "device"))
    description = read_bundle(bundle)
    answered = run_job(device, bundle, description, "answer", ("onnx",), PROMPTS[:1], 2, log=print)["runtimes"]
    assert answered["onnx"]["answers"]
    on_device = tmp_path / "device" / "bundles" / description["id"][:16]
    next(on_device.rglob("*.onnx")).unlink()
    local = ["--device", "local", "--python", sys.executable, "--remote-dir", str(tmp_path / "device")]
    _one_line_error(capsys, main(["bench", str(bundle), *local, "--runtimes", "onnx"]), "partial bundle")
    assert not list((tmp_path / "device" / "jobs").iterdir())


def test_device_folder_that_cannot_be_written(bundle, tmp_path, capsys):
    """The bundle cannot be unpacked on the device: one line, and no `.partial` folder is left behind."""
    (tmp_path / "bundles").write_text("a file where the device keeps its bundles")
    local = ["--device", "local", "--python", sys.executable, "--remote-dir", str(tmp_path)]
    _one_line_error(capsys, main(["bench", str(bundle), *local]), "local:", "Not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["bundles"]


def test_adb_without_adb_or_without_a_phone(bundle, tmp_path, monkeypatch, capsys):
    """adb up to the point a phone is needed: no adb on PATH, then (where adb is installed) no device attached."""
    adb = shutil.which("adb")
    monkeypatch.setenv("PATH", str(tmp_path))
    _one_line_error(capsys, main(["bench", str(bundle), "--device", "adb"]), "adb not found")
    if adb is None:
        return
    monkeypatch.setenv("PATH", str(Path(adb).parent) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(_free_port()))  # a server of this test's own
    try:
        _one_line_error(capsys, main(["bench", str(bundle), "--device", "adb:emulator-5554"]), "adb-emulator-5554")
        _one_line_error(capsys, main(["bench", str(bundle), "--device", "adb"]), "no Android device attached")
    finally:
        subprocess.run([adb, "kill-server"], capture_output=True)


def test_bad_device_specs(bundle, capsys):
    for spec in ("ssh://", "ssh:/host", "usb", "ssh://a@b:port"):
        _one_line_error(capsys, main(["bench", str(bundle), "--device", spec]), "--device")


def test_llama_bin_without_the_tools_or_a_device(built, tmp_path, capsys):
    local = ["--device", "local", "--remote-dir", str(tmp_path / "device")]
    _one_line_error(capsys, main(["bench", str(built), *local, "--llama-bin", str(tmp_path)]), "no llama-bench")
    _one_line_error(capsys, main(["verify", str(built), "--llama-bin", str(tmp_path)]), "give --device")
    assert not (tmp_path / "device" / "tools").exists()


def test_parse_facts_of_a_jetson_and_a_phone():
    """The facts script's output as two devices print it (fixed text: no board here)."""
    jetson = parse_facts(
        "arch=aarch64\nkernel=Linux 5.15.148-tegra\ncores=6\nmemory=MemTotal:        7802104 kB\n"
        "cpu= Cortex-A78AE\ncpuinfo=\nos=Ubuntu 22.04.4 LTS\nandroid=\nmodel=NVIDIA Jetson Orin Nano Developer Kit\n"
        "jetson=# R36 (release), REVISION: 4.0\npower_mode=NV Power Mode: 15W\n"
    )
    assert jetson == {
        "arch": "aarch64",
        "cpu": "Cortex-A78AE",
        "cores": 6,
        "memory_mib": 7619,
        "os": "Ubuntu 22.04.4 LTS",
        "model": "NVIDIA Jetson Orin Nano Developer Kit",
        "jetson": "# R36 (release), REVISION: 4.0",
        "power_mode": "NV Power Mode: 15W",
    }
    phone = parse_facts("arch=aarch64\ncores=8\nmemory=MemTotal: 11710928 kB\ncpuinfo= Qualcomm SM8550\nandroid=14\n")
    assert phone["os"] == "Android 14" and phone["cpu"] == "Qualcomm SM8550" and phone["memory_mib"] == 11436


ARM64 = Path.home() / ".cache" / "edgekit" / "arm64-py311"  # tests/arm64/sysroot.sh writes it on first use


@pytest.mark.slow
def test_bundle_answers_the_same_on_arm64(export, bundle, tmp_path):
    """The bundle under qemu-user on Debian's arm64 Python with the registry's aarch64 numpy, onnxruntime,
    onnxruntime-genai, tokenizers and Pillow wheels: architecture-clean, and the same tokens as on x86-64. gguf and
    hybrid are left out: llama-cpp-python has no aarch64 wheel (it compiles on the board)."""
    if shutil.which("qemu-aarch64-static") is None and not os.environ.get("CI"):
        pytest.skip("qemu-aarch64-static missing (apt install qemu-user-static)")
    if not (ARM64 / "done").is_file():
        script = Path(__file__).parent / "arm64" / "sysroot.sh"
        subprocess.run(["bash", str(script), str(ARM64), str(bundle / "requirements.txt")], check=True)
    python = tmp_path / "python-arm64"
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH="$PYTHONPATH:{ARM64 / "site"}" exec qemu-aarch64-static -L {ARM64 / "root"} '
        f'{ARM64 / "root" / "usr" / "bin" / "python3.11"} "$@"\n'
    )
    python.chmod(0o755)
    kinds = ("onnx", "ortgenai")
    device = LocalDevice(str(python), str(tmp_path / "device"))
    got = run_job(device, bundle, read_bundle(bundle), "answer", kinds, PROMPTS, 12, log=print)
    assert got["python"]["machine"] == "aarch64"
    for kind in kinds:
        assert "error" not in got["runtimes"][kind], got["runtimes"][kind]
        runtime = open_runtime(kind, export)
        want = [runtime.generate(p, 12) for p in PROMPTS]
        same = sum(a["tokens"] == w for a, w in zip(got["runtimes"][kind]["answers"], want))
        print(f"{kind} on arm64 (qemu): {same}/{len(want)} prompts token-identical to x86-64")
        assert same == len(want), kind


@pytest.mark.slow
def test_llama_tools_bench_and_verify_without_python(built, sshd, tmp_path, monkeypatch):
    """`--llama-bin` over ssh with no Python on the device (`--python` names none): llama-bench measures the
    language model, llama-mtmd-cli answers the eval split, and the gate judges those answers as the gguf artifact's.
    The tools are built from the llama.cpp that llama-cpp-python vendors (tests/llama_tools.sh, once)."""
    import llama_cpp

    tools = Path.home() / ".cache" / "edgekit" / f"llama-tools-{llama_cpp.__version__}"
    if not (tools / "llama-mtmd-cli").is_file():
        script = Path(__file__).parent / "llama_tools.sh"
        subprocess.run(["bash", str(script), str(tools), llama_cpp.__version__], check=True)
    monkeypatch.setenv("EDGEKIT_SSH_OPTIONS", sshd.options())
    device = ["--device", sshd.url, "--python", "/no/python", "--remote-dir", str(tmp_path), "--llama-bin", str(tools)]
    assert main(["bench", str(built), *device, "--prompts", "1", "--max-new-tokens", "8"]) == 0
    label = SshDevice(getpass.getuser(), "127.0.0.1", sshd.port, None, None).label
    row = json.loads((built / DEVICES_DIR / label / "bench.json").read_text())["rows"]["gguf"]
    assert row["tool"] == "llama-bench" and row["prompt_tokens"] > 1
    assert row["lm_prefill_ms"] > 0 and row["decode_tok_s"] > 0 and row["rss_samples"] >= 1

    assert main(["verify", str(built), *device]) == 0
    there = [json.loads(line) for line in (built / DEVICES_DIR / label / "answers_gguf.jsonl").read_text().splitlines()]
    here = [json.loads(line) for line in (built / Stage.SAFETY / "answers_gguf.jsonl").read_text().splitlines()]
    assert [a["id"] for a in there] == [a["id"] for a in here]
    assert sum(bool(a["response"].strip()) for a in there) >= len(there) // 2
    same = sum(a["response"] == b["response"] for a, b in zip(there, here))
    print(f"llama-mtmd-cli: {same}/{len(here)} answers equal to the gguf runtime's (llama-cpp-python's mtmd)")
