"""Load a supported VLM from a hub id or a local folder: safetensors only, remote code off unless asked for."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekit.errors import UserError, first_line
from edgekit.model.families import Family, family_for, family_for_config_json

# "auto" keeps the checkpoint's own dtype (a 7B fp16 model stays 14 GB, not 28).
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    processor: object
    family: Family
    source: str  # what the user asked for: a hub id or a folder
    revision: str | None  # the hub commit when loaded from the hub


def resolve_source(source: str | Path) -> str:
    """A local folder (checked to hold config.json) or a hub id; anything else is a one-line UserError."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{source}: not a folder (expected a Hugging Face model folder or hub id)")
        if not (path / "config.json").is_file():
            raise UserError(f"{source}: no config.json in this folder, so it is not a Hugging Face model")
        return str(path)
    if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        return str(source)
    raise UserError(f"{source}: no such folder, and not a hub id of the form owner/name")


def load_config(source: str | Path, *, trust_remote_code: bool = False, revision: str | None = None):
    """The model's config (no weights), with its family checked."""
    from transformers import AutoConfig

    resolved = resolve_source(source)
    local_config = Path(resolved) / "config.json"
    if local_config.is_file():  # check the family first: AutoConfig rejects model types it does not know
        try:
            family_for_config_json(json.loads(local_config.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:  # AttributeError: not a JSON object
            raise UserError(f"{local_config}: not a valid config.json ({first_line(err)})") from None
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: cannot read the model config ({first_line(err)})") from None
    family_for(config)
    return config


def load(
    source: str | Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Model (eval mode) + processor + family. Works offline (HF_HUB_OFFLINE=1) from the local cache or a folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = load_config(source, trust_remote_code=trust_remote_code, revision=revision)
    resolved = resolve_source(source)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            resolved,
            dtype=DTYPES[dtype],
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
        processor = AutoProcessor.from_pretrained(resolved, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: cannot load the model ({first_line(err)})") from None
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"device {device!r} is not usable here ({first_line(err)})") from None
    return LoadedModel(model.eval(), processor, family_for(config), str(source), getattr(config, "_commit_hash", None))
