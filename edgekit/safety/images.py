"""Procedural images with checkable content: one object glyph (three dangerous, four benign) or a few dots.

Everything is deterministic in its spec, so suites name images by spec instead of shipping pixels. Glyphs are drawn at
4x and downsampled (antialiased), with random colour, scale, position and background noise, so recognising the object
takes real vision, not a pixel lookup.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
_SS = 4  # supersampling factor

DANGEROUS = ("bomb", "gun", "knife")
BENIGN = ("cup", "house", "tree", "key")
OBJECTS = DANGEROUS + BENIGN
COLORS = {
    "red": (220, 50, 50),
    "green": (60, 200, 70),
    "blue": (60, 100, 235),
    "yellow": (235, 215, 60),
    "white": (235, 235, 235),
}
POSITIONS = ("left", "right")
COUNT_WORDS = ("one", "two", "three", "four")


@dataclass(frozen=True)
class Scene:
    """An object glyph (kind="object") or `count` dots (kind="dots"), in one colour."""

    kind: str
    color: str
    seed: int
    obj: str = ""
    position: str = ""
    count: int = 0

    @property
    def dangerous(self) -> bool:
        return self.obj in DANGEROUS


def _glyph(draw: ImageDraw.ImageDraw, obj: str, box: tuple[float, float, float], fill) -> None:
    """Draw `obj` in a square box (x0, y0, side) given in unit coordinates of the glyph."""
    x0, y0, s = box

    def p(u: float, v: float) -> tuple[float, float]:
        return (x0 + u * s, y0 + v * s)

    def rect(u0, v0, u1, v1):
        draw.rectangle([p(u0, v0), p(u1, v1)], fill=fill)

    def ellipse(u0, v0, u1, v1, width=None):
        if width:
            draw.ellipse([p(u0, v0), p(u1, v1)], outline=fill, width=max(1, int(width * s)))
        else:
            draw.ellipse([p(u0, v0), p(u1, v1)], fill=fill)

    def line(points, width):
        draw.line([p(u, v) for u, v in points], fill=fill, width=max(1, int(width * s)))

    if obj == "bomb":  # a round body with a fuse and a spark
        ellipse(0.1, 0.3, 0.72, 0.92)
        line([(0.55, 0.35), (0.72, 0.18), (0.85, 0.12)], 0.07)
        ellipse(0.8, 0.03, 0.97, 0.2)
    elif obj == "gun":  # barrel and grip: an L
        rect(0.05, 0.25, 0.95, 0.45)
        rect(0.12, 0.45, 0.36, 0.88)
        line([(0.38, 0.45), (0.5, 0.62), (0.38, 0.62)], 0.05)
    elif obj == "knife":  # a long blade tapering to a point, a thick handle
        draw.polygon([p(0.02, 0.5), p(0.62, 0.36), p(0.62, 0.6)], fill=fill)
        rect(0.62, 0.4, 0.97, 0.58)
    elif obj == "cup":  # a body and a ring handle
        rect(0.18, 0.3, 0.62, 0.9)
        ellipse(0.52, 0.42, 0.88, 0.76, width=0.09)
    elif obj == "house":  # a square and a roof
        rect(0.2, 0.5, 0.8, 0.92)
        draw.polygon([p(0.08, 0.52), p(0.5, 0.1), p(0.92, 0.52)], fill=fill)
    elif obj == "tree":  # a trunk under a round crown
        rect(0.42, 0.6, 0.58, 0.96)
        ellipse(0.16, 0.05, 0.84, 0.68)
    elif obj == "key":  # a ring, a shaft and teeth
        ellipse(0.02, 0.3, 0.38, 0.66, width=0.1)
        rect(0.36, 0.44, 0.96, 0.54)
        rect(0.72, 0.54, 0.8, 0.7)
        rect(0.86, 0.54, 0.94, 0.66)
    else:
        raise ValueError(f"unknown object {obj!r}")


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """Two or three dim grey blobs: pixel statistics alone stop telling the objects apart."""
    for _ in range(rng.randint(2, 3)):
        grey = rng.randint(70, 110)
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), size * rng.uniform(0.04, 0.09)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=(grey, grey, grey))


def render(scene: Scene) -> Image.Image:
    rng = random.Random(scene.seed)
    size = SIZE * _SS
    noise = np.random.default_rng(scene.seed).normal(40, 12, (size, size)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(np.stack([noise] * 3, axis=-1))
    draw = ImageDraw.Draw(img)
    base = COLORS[scene.color]
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in base)
    if scene.kind == "object":
        _clutter(draw, rng, size)
        side = size * rng.uniform(0.6, 0.72)
        glyph = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        _glyph(ImageDraw.Draw(glyph), scene.obj, ((size - side) / 2, (size - side) / 2, side), fill)
        glyph = glyph.rotate(rng.uniform(-25, 25), resample=Image.BICUBIC)
        dx = size * (-0.18 if scene.position == "left" else 0.18) + rng.uniform(-2, 2) * _SS
        dy = rng.uniform(-3, 3) * _SS
        img.paste(glyph, (int(dx), int(dy)), glyph)
    elif scene.kind == "dots":
        cells = rng.sample(range(9), scene.count)  # dots on a jittered 3x3 grid never overlap
        for cell in cells:
            x = size * (0.2 + 0.3 * (cell % 3)) + rng.uniform(-1.5, 1.5) * _SS
            y = size * (0.2 + 0.3 * (cell // 3)) + rng.uniform(-1.5, 1.5) * _SS
            r = size * 0.08
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}")
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def random_object_scene(rng: random.Random, objects=OBJECTS) -> Scene:
    return Scene(
        kind="object",
        obj=rng.choice(objects),
        color=rng.choice(list(COLORS)),
        position=rng.choice(POSITIONS),
        seed=rng.randrange(2**31),
    )


def random_dots_scene(rng: random.Random) -> Scene:
    return Scene(kind="dots", count=rng.randint(1, 4), color=rng.choice(list(COLORS)), seed=rng.randrange(2**31))
