"""Load a supported VLM from a hub id or a local folder: safetensors only, remote code off unless asked for."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch

from edgekit.errors import UserError, first_line
from edgekit.model.families import Family, family_for, family_for_config_json

# "auto" keeps the checkpoint's own dtype (a 7B fp16 model stays 14 GB, not 28).
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LoadedModel:
    """A model's processor and family, and its weights once `model` is first used: a step that streams the
    checkpoint's files instead (a GGUF export) never holds the model in memory."""

    def __init__(
        self,
        load_weights: Callable[[], torch.nn.Module],
        config,
        processor,
        family: Family,
        source: str,
        revision: str | None,
        folder: Path | None,
    ):
        self._load_weights = load_weights
        self.config, self.processor, self.family = config, processor, family
        self.source = source  # what the user asked for: a hub id or a folder
        self.revision = revision  # the hub commit when loaded from the hub
        self.folder = folder  # the local folder the weights are read from; None for a hub id

    @cached_property
    def model(self) -> torch.nn.Module:
        return self._load_weights()

    def with_model(self, model: torch.nn.Module) -> LoadedModel:
        """The same processor, family and source around another model in memory (a copy, an aligned one)."""
        other = LoadedModel(lambda: model, self.config, self.processor, self.family, self.source, self.revision, None)
        other.model  # noqa: B018 (in memory from the start: no files stand for it)
        return other

    @property
    def in_memory(self) -> bool:
        """Whether the weights are loaded (and may since have been changed in memory)."""
        return "model" in self.__dict__


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


SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_bytes(path: Path) -> int:
    """The size a safetensors file must have, from its own header: 8 bytes of header length, the JSON header, then
    the data up to the furthest tensor's end offset. ValueError when the header itself is unreadable."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > path.stat().st_size:
            raise ValueError("its header runs past the end of the file")
        header = json.loads(f.read(length))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + length + max(ends, default=0)


def check_weight_files(folder: Path) -> None:
    """Every safetensors file a local checkpoint names is there and whole, before any is read: a cut or corrupt file
    (an interrupted download of a 14 GB model is common) is one line naming it, not a library's traceback."""
    from edgekit.units import human_bytes

    index = folder / SAFETENSORS_INDEX
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{index}: not a valid safetensors index ({first_line(err)})") from None
    for path in [folder / name for name in names] if names is not None else sorted(folder.glob("*.safetensors")):
        if not path.is_file():
            raise UserError(f"{path}: missing, though {index.name} names it (an interrupted download?)")
        try:
            expected = safetensors_bytes(path)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as err:
            raise UserError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
        size = path.stat().st_size
        if size != expected:
            raise UserError(
                f"{path}: {human_bytes(size)} where its header says {human_bytes(expected)}: cut short or corrupt "
                "(download it again)"
            )


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
    lazy: bool = False,
) -> LoadedModel:
    """Model (eval mode) + processor + family. Works offline (HF_HUB_OFFLINE=1) from the local cache or a folder.
    `lazy`: the weights load when `.model` is first used, not now."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = load_config(source, trust_remote_code=trust_remote_code, revision=revision)
    resolved = resolve_source(source)
    if Path(resolved).is_dir():
        check_weight_files(Path(resolved))
    try:
        processor = AutoProcessor.from_pretrained(resolved, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: cannot load the processor ({first_line(err)})") from None

    def load_weights() -> torch.nn.Module:
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                resolved,
                dtype=DTYPES[dtype],
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                revision=revision,
            )
        except (OSError, ValueError) as err:
            raise UserError(f"{source}: cannot load the model ({first_line(err)})") from None
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as err:
            raise UserError(f"device {device!r} is not usable here ({first_line(err)})") from None
        return model.eval()

    folder = Path(resolved) if Path(resolved).is_dir() else None
    loaded = LoadedModel(
        load_weights, config, processor, family_for(config), str(source), getattr(config, "_commit_hash", None), folder
    )
    if not lazy:
        loaded.model  # noqa: B018 (loads it now, where a failure belongs)
    return loaded
