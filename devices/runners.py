"""Device runners: one interface over the places a bundle runs, chosen by `--device`.

| `--device`               | the device                          | transport                                     |
|--------------------------|-------------------------------------|-----------------------------------------------|
| `local`                  | this machine                        | `sh -c`, files streamed through tar           |
| `ssh://user@host[:port]` | a Jetson or any Linux board         | OpenSSH's `ssh` (BatchMode), tar over stdin    |
| `adb` or `adb:SERIAL`    | an Android phone                    | `adb shell`, `adb push` to /data/local/tmp    |

Everything a runner does is a POSIX shell script on the device, so a board needs no edgekit install, only a Python
with the bundle's requirements (`--python`, default `python3`). ssh takes its keys, users and jump hosts from
~/.ssh/config, plus whatever options EDGEKIT_SSH_OPTIONS adds (e.g. `-i KEY -o UserKnownHostsFile=FILE`). Copies are
atomic: a bundle goes to a `.partial` folder renamed when whole, so a cut transfer leaves nothing that looks whole.
A device that cannot be reached, refuses the key, or lacks room is one line naming it (a UserError, exit code 2).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from edgekit.errors import UserError

# Device facts as key=value lines, from what a Linux board or an Android shell has (each line may be empty).
FACTS_SCRIPT = r"""
echo "arch=$(uname -m)"
echo "kernel=$(uname -sr)"
echo "cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null)"
echo "memory=$(grep -m1 MemTotal /proc/meminfo 2>/dev/null)"
echo "cpu=$(lscpu 2>/dev/null | grep -m1 'Model name' | cut -d: -f2)"
echo "cpuinfo=$(grep -m1 -E '^(model name|Hardware)' /proc/cpuinfo 2>/dev/null | cut -d: -f2)"
echo "os=$( (. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") )"
echo "android=$(getprop ro.build.version.release 2>/dev/null)"
echo "model=$(getprop ro.product.model 2>/dev/null || cat /proc/device-tree/model 2>/dev/null | tr -d '\0')"
echo "jetson=$(head -1 /etc/nv_tegra_release 2>/dev/null)"
echo "power_mode=$(nvpmodel -q 2>/dev/null | grep -m1 'Power Mode')"
"""


def parse_facts(text: str) -> dict[str, str | int]:
    """FACTS_SCRIPT's output as the facts a report shows: arch, cpu, cores, memory_mib, os, model and, on a Jetson,
    its L4T release and power mode."""
    raw = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if value.strip():
            raw[key.strip()] = " ".join(value.split())
    facts: dict[str, str | int] = {"arch": raw.get("arch", "?"), "cpu": raw.get("cpu") or raw.get("cpuinfo", "?")}
    if raw.get("cores", "").isdigit():
        facts["cores"] = int(raw["cores"])
    if memory := re.search(r"(\d+)\s*kB", raw.get("memory", "")):
        facts["memory_mib"] = int(memory.group(1)) // 1024
    facts["os"] = f"Android {raw['android']}" if raw.get("android") else raw.get("os", raw.get("kernel", "?"))
    for key in ("model", "jetson", "power_mode"):
        if raw.get(key):
            facts[key] = raw[key]
    return facts


class Device(ABC):
    """A place to run bundles. `root` is where bundles and jobs live on it; `python` runs the job runner."""

    label: str  # names the device's results folder: letters, digits, dots, dashes
    root: str
    python: str

    @abstractmethod
    def argv(self, script: str) -> list[str]:
        """The local command that runs the POSIX shell `script` on the device."""

    def fail(self, result: subprocess.CompletedProcess) -> UserError:
        last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return UserError(f"{self.label}: {last}")

    def shell(self, script: str, timeout: float = 600) -> str:
        """`script`'s stdout; its failure is one line naming the device."""
        try:
            # errors="replace": a tool printing a model's raw token pieces may cut a UTF-8 character in two
            result = subprocess.run(
                self.argv(script), capture_output=True, text=True, errors="replace", timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise UserError(f"{self.label}: no answer in {timeout:g} s") from None
        if result.returncode != 0:
            raise self.fail(result)
        return result.stdout

    def check(self, python: bool = True) -> None:
        """Reachable, with a working shell and (unless llama.cpp's tools run instead) the runner's Python."""
        out = self.shell(f"command -v {shlex.quote(self.python)} || echo NO_PYTHON", timeout=60)
        if python and "NO_PYTHON" in out:
            raise UserError(f"{self.label}: no {self.python} on the device: {self.no_python_hint()}")

    def no_python_hint(self) -> str:
        return (
            "install Python 3.10+ there, or pass --python with the path of one, or --llama-bin with a build of "
            "llama.cpp's llama-bench and llama-mtmd-cli for it"
        )

    def facts(self) -> dict:
        return {"device": self.label, **parse_facts(self.shell(FACTS_SCRIPT, timeout=60))}

    def free_bytes(self, folder: str) -> int | None:
        """Free space where `folder` lives (df -Pk), or None where df does not say."""
        out = self.shell(f"mkdir -p {shlex.quote(folder)} && df -Pk {shlex.quote(folder)} | tail -1", timeout=60)
        fields = out.split()
        return int(fields[3]) * 1024 if len(fields) >= 4 and fields[3].isdigit() else None

    def push(self, local: Path, remote: str) -> None:
        """Copy folder `local` to `remote` on the device, whole or not at all (a `.partial` folder, then a rename)."""
        partial, whole = shlex.quote(remote + ".partial"), shlex.quote(remote)
        script = f"rm -rf {partial} {whole} && mkdir -p {partial} && tar -xf - -C {partial} && mv {partial} {whole}"
        process = subprocess.Popen(self.argv(script), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=process.stdin, mode="w|") as tar:
                for path in sorted(local.rglob("*")):
                    if path.is_file():
                        tar.add(path, arcname=path.relative_to(local).as_posix(), recursive=False)
            process.stdin.close()
        except BrokenPipeError:
            pass  # the device side failed; its stderr says why
        stderr = process.stderr.read().decode(errors="replace")
        if process.wait() != 0:
            self.remove(remote + ".partial")
            raise self.fail(subprocess.CompletedProcess([], process.returncode, "", stderr))

    def remove(self, remote: str) -> None:
        try:
            self.shell(f"rm -rf {shlex.quote(remote)}", timeout=120)
        except UserError:
            pass  # best effort: the device may be gone, which the caller reports

    def run_streaming(self, script: str, log: Callable[[str], None]) -> tuple[int, str]:
        """Run `script`, passing each stderr line to `log` (the runner's progress); (exit code, last stderr line)."""
        process = subprocess.Popen(
            self.argv(script), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
        )
        last = ""
        for line in process.stderr:
            if line.strip():
                last = line.strip()
                log(f"  [{self.label}] {last}")
        return process.wait(), last


class LocalDevice(Device):
    label = "local"

    def __init__(self, python: str | None = None, root: str | None = None):
        self.python = python or sys.executable
        self.root = root or str(Path.home() / ".cache" / "edgekit" / "device")

    def argv(self, script: str) -> list[str]:
        return ["sh", "-c", script]


class SshDevice(Device):
    """A Linux board over OpenSSH: batch mode (never a password prompt), a connect timeout, and the remote paths
    relative to the login's home."""

    def __init__(self, user: str | None, host: str, port: int | None, python: str | None, root: str | None):
        if shutil.which("ssh") is None:
            raise UserError("ssh not found on PATH: install the OpenSSH client")
        self.target = f"{user}@{host}" if user else host
        self.port, self.python, self.root = port, python or "python3", root or ".cache/edgekit/device"
        self.label = re.sub(r"[^A-Za-z0-9.-]+", "-", f"ssh-{self.target}" + (f"-{port}" if port else ""))

    def argv(self, script: str) -> list[str]:
        options = [
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=15",
            *shlex.split(os.environ.get("EDGEKIT_SSH_OPTIONS", "")),
        ]
        return ["ssh", *options, *(["-p", str(self.port)] if self.port else []), self.target, script]

    def fail(self, result: subprocess.CompletedProcess) -> UserError:
        if result.returncode == 255:  # ssh's own failure: unreachable, refused key, unknown host key
            lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Warning:")]
            return UserError(f"{self.label}: ssh: {(lines or ['connection failed'])[-1]}")
        return super().fail(result)


class AdbDevice(Device):
    """An Android phone over adb. Python there comes from Termux or a user's own build (`--python`)."""

    def __init__(self, serial: str | None, python: str | None, root: str | None):
        if shutil.which("adb") is None:
            raise UserError("adb not found on PATH: install Android platform-tools (Debian: apt install adb)")
        self.serial, self.python, self.root = serial, python or "python3", root or "/data/local/tmp/edgekit"
        self.label = re.sub(r"[^A-Za-z0-9.-]+", "-", f"adb-{serial}" if serial else "adb")

    def adb(self, *args: str) -> list[str]:
        return ["adb", *(["-s", self.serial] if self.serial else []), *args]

    def argv(self, script: str) -> list[str]:
        return self.adb("shell", script)

    def check(self, python: bool = True) -> None:
        try:
            result = subprocess.run(self.adb("get-state"), capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise UserError(f"{self.label}: adb did not answer in 60 s") from None
        state = result.stdout.strip()
        if state != "device":
            why = (result.stderr.strip().splitlines() or [state or "no state"])[-1].removeprefix("error: ")
            if "unauthorized" in why:
                why += ": accept the USB debugging prompt on the phone"
            elif "no devices" in why:
                why = "no Android device attached (adb devices lists none); connect one with USB debugging on"
            raise UserError(f"{self.label}: {why}")
        super().check(python)

    def no_python_hint(self) -> str:
        return (
            "install Termux's python (then pip install -r requirements.txt) and pass --python with its path, or "
            "pass --llama-bin with an Android (arm64-v8a) build of llama.cpp's llama-bench and llama-mtmd-cli"
        )

    def push(self, local: Path, remote: str) -> None:
        partial = remote + ".partial"
        self.remove(partial)
        result = subprocess.run(self.adb("push", f"{local}/.", partial), capture_output=True, text=True)
        if result.returncode != 0:
            self.remove(partial)
            raise self.fail(result)
        self.shell(f"rm -rf {shlex.quote(remote)} && mv {shlex.quote(partial)} {shlex.quote(remote)}")


def parse_device(spec: str, python: str | None = None, root: str | None = None) -> Device:
    """`local`, `ssh://user@host[:port]` or `adb[:SERIAL]` as a Device."""
    if spec == "local":
        return LocalDevice(python, root)
    if spec == "adb" or spec.startswith("adb:"):
        return AdbDevice(spec.partition(":")[2] or None, python, root)
    if match := re.fullmatch(r"ssh://(?:([^@/:]+)@)?([^@/:]+)(?::(\d+))?/?", spec):
        user, host, port = match.groups()
        return SshDevice(user, host, int(port) if port else None, python, root)
    raise UserError(f"--device {spec!r}: expected local, ssh://user@host[:port], adb or adb:SERIAL")
