"""Output folders that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from edgekit.errors import UserError

_terminated_by = 0  # the terminating signal's number once one arrived (`terminate`)


def terminate(signum: int) -> NoReturn:
    """Stop: raise SystemExit(128 + signum) now, and again at every later commit point (`stop_if_terminated`). The
    first raise lands wherever the process is, and a library's finalizer or broad `except` there can swallow it; an
    output must still never be committed after the process was told to stop."""
    global _terminated_by
    _terminated_by = signum
    raise SystemExit(128 + signum)


def stop_if_terminated() -> None:
    if _terminated_by:
        raise SystemExit(128 + _terminated_by)


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty folder without `overwrite`, and a place we cannot write; before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():  # a path under a file would otherwise fail only once the work is done
        raise UserError(f"{out}: cannot write here ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{out}: cannot write here ({parent} is not writable)")
    return out


def save_processor(processor, source: str | Path, folder: str | Path) -> None:
    """The processor's files, plus the SentencePiece `tokenizer.model` that LLaVA repos ship beside tokenizer.json
    (a fast tokenizer's save_pretrained does not write it), so the folder keeps the source's layout."""
    processor.save_pretrained(folder)
    sentencepiece = Path(source) / "tokenizer.model"
    if sentencepiece.is_file():
        shutil.copy(sentencepiece, Path(folder) / "tokenizer.model")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename, on error it vanishes."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent.resolve()))  # absolute: callers join paths
    try:
        yield tmp
        stop_if_terminated()
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
