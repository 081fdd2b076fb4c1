"""The build machine's side of a device job: the bundle copied to the device once (its folder there is named by the
bundle's id), a job folder with the prompts' images, `edgekit.devices.on_device` run there, its result read back,
and the job folder removed whatever happened."""

from __future__ import annotations

import json
import shlex
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from edgekit.devices.on_device import BUNDLE_FILE, JOB_FILE, JOB_VERSION, RESULT_FILE
from edgekit.devices.runners import Device
from edgekit.devices.runtime import Prompt
from edgekit.errors import UserError
from edgekit.units import human_bytes

SPARE_BYTES = 64 << 20  # room left on the device beyond the bundle: the runner's own files, logs


def ensure_copy(device: Device, local: Path, folder: str, marker: str, log: Callable[[str], None]) -> str:
    """`local` copied to `folder` (relative to the device's root) unless a whole copy is there: the copy is renamed
    into place only when whole, so `marker` inside it says so. Checks the room first. Returns `folder`."""
    remote = f"{device.root}/{folder}"
    if device.shell(f"test -f {shlex.quote(remote + '/' + marker)} && echo present || true").strip() == "present":
        return folder
    need = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    free = device.free_bytes(device.root)
    if free is not None and free < need + SPARE_BYTES:
        raise UserError(
            f"{device.label}: {local.name} needs {human_bytes(need + SPARE_BYTES)} in {device.root}, "
            f"the device has {human_bytes(free)} free"
        )
    log(f"copying {local.name} ({human_bytes(need)}) to {device.label}:{remote}")
    device.push(local, remote)
    return folder


def push_prompts(device: Device, prompts: Sequence[Prompt], spec: dict) -> str:
    """A job folder on the device with `spec` as job.json and the prompts' images; its path from the root."""
    job = f"jobs/{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="edgekit-job-") as tmp:
        for i, prompt in enumerate(prompts):
            prompt.image.save(Path(tmp) / f"prompt-{i}.png")
        prompt_files = [{"image": f"prompt-{i}.png", "text": p.text} for i, p in enumerate(prompts)]
        (Path(tmp) / JOB_FILE).write_text(json.dumps({**spec, "prompts": prompt_files}))
        device.push(Path(tmp), f"{device.root}/{job}")
    return job


def run_job(
    device: Device,
    local_bundle: Path,
    bundle: dict,
    command: str,
    runtimes: Sequence[str],
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    rounds: int = 0,
    options: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """`command` (answer or bench, see `edgekit.devices.on_device`) on `device`: {"runtimes": per runtime its result,
    "python": the device Python's machine and version}."""
    device.check()
    folder = ensure_copy(device, local_bundle, f"bundles/{bundle['id'][:16]}", BUNDLE_FILE, log)
    spec = {
        "job_version": JOB_VERSION,
        "bundle": bundle["id"],
        "command": command,
        "runtimes": list(runtimes),
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "options": options or {},
    }
    job = push_prompts(device, prompts, spec)
    job_dir = f"{device.root}/{job}"
    try:
        # From the device root, with the bundle first on the path: its edgekit, not one installed there.
        code, last = device.run_streaming(
            f"cd {shlex.quote(device.root)} && PYTHONPATH={folder}${{PYTHONPATH:+:$PYTHONPATH}} "
            f"{shlex.quote(device.python)} -m edgekit.devices.on_device {job}",
            log,
        )
        if code != 0:
            raise UserError(f"{device.label}: {last or f'the runner exited with code {code}'}")
        result = json.loads(device.shell(f"cat {shlex.quote(job_dir + '/' + RESULT_FILE)}"))
    finally:
        device.remove(job_dir)
    return result
