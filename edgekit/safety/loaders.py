"""Suites users bring: a plain JSONL, AdvBench, JailbreakV-28K / RedTeam-2K, MM-SafetyBench and XSTest files.

Each loader returns suite Items; every malformed row is a UserError naming the file and line. Text-only suites
(AdvBench, XSTest) are paired with benign images: the user's own folder (`images=`) or edgekit's procedural ones.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from itertools import cycle
from pathlib import Path

from edgekit.errors import UserError
from edgekit.safety.suite import Item, Suite, benign_scene

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# JSONL labels -> suite item kinds
_LABEL_KIND = {"harmful": "harmful_text", "benign": "benign_text", "unsafe": "harmful_text", "safe": "benign_text"}


def _image_source(images: str | Path | None) -> Callable[[str], dict]:
    """Benign images for text-only rows: the files of a folder in turn, or a procedural picture per row."""
    if images is None:
        return lambda key: {"scene": benign_scene(key)}
    folder = Path(images)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    pool = cycle(files)
    return lambda key: {"image_path": str(next(pool))}


def _resolve_image(path: Path, value: str, line: int) -> str:
    image = Path(value) if Path(value).is_absolute() else path.parent / value
    if not image.is_file():
        raise UserError(f"{path}:{line}: image not found: {value}")
    return str(image)


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for JSONL, CSV or a JSON list/object of rows."""
    if not path.is_file():
        raise UserError(f"{path}: no such suite file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(text.splitlines()))]
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        rows = data if isinstance(data, list) else [dict(v, id=k) for k, v in data.items()]
        return [(i + 1, row) for i, row in enumerate(rows)]
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return out


def _field(path: Path, line: int, row: dict, *names: str) -> str:
    for name in names:
        if isinstance(row, dict) and str(row.get(name) or "").strip():
            return str(row[name]).strip()
    raise UserError(f"{path}:{line}: missing field {' or '.join(repr(n) for n in names)}")


def load_jsonl(path: Path, images=None) -> list[Item]:
    """{prompt, label: harmful|benign, image?: path}; rows without an image get a benign one."""
    benign_image = _image_source(images)
    items = []
    for line, row in _rows(path):
        prompt, label = _field(path, line, row, "prompt"), _field(path, line, row, "label").lower()
        if label not in _LABEL_KIND:
            raise UserError(f"{path}:{line}: label must be one of {', '.join(_LABEL_KIND)}, got {label!r}")
        key = f"{path.name}:{line}"
        image = {"image_path": _resolve_image(path, row["image"], line)} if row.get("image") else benign_image(key)
        items.append(Item(key, _LABEL_KIND[label], prompt, "eval", **image))
    return items


def load_advbench(path: Path, images=None) -> list[Item]:
    """AdvBench harmful_behaviors.csv: `goal` (and `target`) columns; all harmful."""
    benign_image = _image_source(images)
    return [
        Item(f"advbench:{line}", "harmful_text", _field(path, line, row, "goal"), "eval", **benign_image(f"adv{line}"))
        for line, row in _rows(path)
    ]


def load_jailbreakv(path: Path, images=None) -> list[Item]:
    """JailbreakV-28K / RedTeam-2K CSV: `redteam_query` (or `jailbreak_query`), optional `image_path`, `policy`."""
    benign_image = _image_source(images)
    items = []
    for line, row in _rows(path):
        prompt = _field(path, line, row, "jailbreak_query", "redteam_query", "question")
        image = row.get("image_path")
        source = {"image_path": _resolve_image(path, image, line)} if image else benign_image(f"jbv{line}")
        items.append(Item(f"jailbreakv:{line}", "harmful_text", prompt, "eval", row.get("policy", ""), **source))
    return items


def load_mm_safetybench(path: Path, images=None) -> list[Item]:
    """MM-SafetyBench JSON (id -> {Question, Rephrased Question, image}): the harm is partly in the image."""
    items = []
    for line, row in _rows(path):
        prompt = _field(path, line, row, "Rephrased Question", "Question")
        image = _resolve_image(path, _field(path, line, row, "image", "image_path"), line)
        items.append(Item(f"mmsb:{row.get('id', line)}", "harmful_image", prompt, "eval", image_path=image))
    return items


def load_xstest(path: Path, images=None) -> list[Item]:
    """XSTest CSV: `prompt`, `type` (contrast_* types are unsafe); safe prompts measure over-refusal."""
    benign_image = _image_source(images)
    items = []
    for line, row in _rows(path):
        kind = "harmful_text" if _field(path, line, row, "type").startswith("contrast") else "benign_text"
        items.append(
            Item(f"xstest:{line}", kind, _field(path, line, row, "prompt"), "eval", **benign_image(f"xs{line}"))
        )
    return items


# (how a file is recognised, loader): first match wins
_FORMATS: tuple[tuple[Callable[[Path, set[str]], bool], Callable], ...] = (
    (lambda p, cols: "goal" in cols, load_advbench),
    (lambda p, cols: bool({"redteam_query", "jailbreak_query"} & cols), load_jailbreakv),
    (lambda p, cols: bool({"Question", "Rephrased Question"} & cols), load_mm_safetybench),
    (lambda p, cols: {"prompt", "type"} <= cols and p.suffix == ".csv", load_xstest),
    (lambda p, cols: "prompt" in cols, load_jsonl),
)


def load_suite(path: str | Path, images: str | Path | None = None) -> Suite:
    """A user suite file in any supported format, recognised by its columns."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path}: the suite file has no rows")
    line, first = rows[0]
    if not isinstance(first, dict):
        raise UserError(f"{path}:{line}: expected an object with named fields")
    for matches, loader in _FORMATS:
        if matches(path, set(first)):
            return Suite(path.name, tuple(loader(path, images)))
    raise UserError(
        f"{path}:{line}: unknown suite format (columns {sorted(first)}); expected JSONL {{prompt, label, image?}}, "
        "AdvBench, JailbreakV-28K/RedTeam-2K, MM-SafetyBench or XSTest"
    )


def read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """Prompts and responses from a JSONL or CSV with columns prompt and response (or completion)."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path}: no rows")
    pairs = [
        (_field(path, line, row, "prompt"), str((row or {}).get("response", row.get("completion")) or ""))
        for line, row in rows
    ]
    for line, row in rows:
        if not isinstance(row, dict) or ("response" not in row and "completion" not in row):
            raise UserError(f"{path}:{line}: missing field 'response' or 'completion'")
    return [p for p, _ in pairs], [r for _, r in pairs]
