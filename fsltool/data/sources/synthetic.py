"""Procedural Omniglot-like glyphs: a few-shot data set the toolkit generates itself, with no download.

Each class is a random "character" of 2-4 strokes (quadratic or cubic Bezier curves, or polylines);
each instance re-draws it with control-point noise, a small affine transform and a stroke-width change,
so the instances of a class differ while classes stay confusable, as in handwritten alphabets.

Every image comes from its own PCG64 stream keyed by (seed, class, instance), so any single image renders
on its own, in any order. Only exact IEEE operations (+, -, *, /) turn the random bits into integer pixel
coordinates (no trigonometry, no BLAS, no normal deviates), and Pillow rasterises integer coordinates,
so the bytes depend neither on the platform nor on the loading order (a Pillow release that changed its
line rasteriser, or a NumPy release that changed a Generator method, could change them: the tests pin a
digest to catch that).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from fsltool.data.sources.base import ClassSpec, SourceListing, split_by_ratios
from fsltool.errors import FsltoolError

# Bumped whenever a change to the drawing changes the bytes, so packed files can tell generators apart.
_VERSION = 1

# Stream tags, the first word of each spawn key: they keep split, character and instance draws apart.
_CHARACTER_STREAM, _INSTANCE_STREAM = 1, 2
_PALETTE_STREAM, _PAINT_STREAM = 3, 4  # colour images only: a class's ink colour, an instance's paint

# Colour images (``colour=True``): the glyph in its class's ink, varied per instance, on a background of two
# random colours blended left to right plus pixel noise, so neither colour nor background alone names the class.
_INK_JITTER = 70  # per-channel change of the class's ink colour per instance, out of 255
_NOISE = 24  # per-pixel background noise, out of 255

_SUPERSAMPLE = 4  # drawn at 4x and box-reduced: antialiased strokes from Pillow's aliased rasteriser
_BEZIER_POINTS = 12  # samples per Bezier curve: smooth at 28 px, cheap to draw
_EXTENT = 0.65  # control points lie in [-_EXTENT, _EXTENT]^2 of the canvas' [-1, 1]^2 frame
_CONNECT_PROBABILITY = 0.6  # chance that a stroke starts where an earlier one ends, as in real letters
_REFERENCE_SIZE = 28  # pixel amounts below are for 28-pixel images and scale with ``size``
_WIDTH_RANGE = (1.4, 2.4)  # stroke width of a character, in pixels

# The default difficulty. Measured (scripts-free: 400 classes, Conv-4 ProtoNet, 400 training episodes of
# 20w5s5q): at 1.0 untrained/trained 5w1s test accuracy was 66/95%, at 2.0 34/65%; 1.5 sits between:
# meta-training clearly helps and the problem stays far from solved.
DEFAULT_JITTER = 1.5

# Per-instance jitter at jitter=1.0 (each scales linearly with ``jitter``).
_POINT_NOISE = 0.1  # control-point shift, in units of the [-1, 1] frame
_TAN_HALF_ROTATION = 0.13165249758739583  # tan(7.5 deg): rotations up to about 15 deg (rational form)
_SCALE = 0.15  # scale in 1 +- 0.15
_SHEAR = 0.15  # horizontal shear factor in +-0.15
_SHIFT = 2.0 / (_REFERENCE_SIZE / 2)  # translation of up to 2 pixels, in units of the [-1, 1] frame
_WIDTH_CHANGE = 0.25  # stroke width times 1 +- 0.25
_MIN_SCALE = 0.25  # floor of the scale and width factors: large jitters must not mirror or erase a glyph


def _bernstein(degree: int) -> np.ndarray:
    """Bezier basis weights, shape (_BEZIER_POINTS, degree + 1), from exact arithmetic only."""
    t = np.arange(_BEZIER_POINTS, dtype=np.float64) / (_BEZIER_POINTS - 1)
    s = 1.0 - t
    if degree == 2:
        return np.stack([s * s, 2.0 * s * t, t * t], axis=1)
    return np.stack([s * s * s, 3.0 * s * s * t, 3.0 * s * t * t, t * t * t], axis=1)


_BASES = {2: _bernstein(2), 3: _bernstein(3)}
_POLYLINE = 0  # stroke kinds are Bezier degrees (2 quadratic, 3 cubic) or this one
_KINDS = (2, 3, _POLYLINE)


@dataclass(frozen=True)
class _Character:
    """A class's glyph, laid out so that an instance renders with a handful of whole-array operations.

    Each path point is a weighted sum of up to 4 control points (Bezier weights, or weight 1 on a polyline
    vertex): ``sum_k weights[:, k] * points[index[:, k]]``. Strokes that meet share the control point,
    so they stay joined whatever the per-instance noise.
    """

    points: np.ndarray  # (controls, 2) in the [-1, 1] frame of the canvas
    index: np.ndarray  # (path points, 4) control-point indices
    weights: np.ndarray  # (path points, 4)
    strokes: tuple[tuple[int, int], ...]  # [start, stop) of each stroke in the path points
    caps: tuple[int, ...]  # path points that get a round cap: stroke ends and polyline corners
    width: float  # stroke width in pixels of a _REFERENCE_SIZE image


def _generator(seed: int, *key: int) -> np.random.Generator:
    """The PCG64 stream of one key; spawn keys pad the seed to 128 bits, so keys of any length never collide."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


@lru_cache(maxsize=4096)  # each character is drawn once, not once per image; 4096 bounds the memory
def _character(seed: int, class_index: int) -> _Character:
    """Draw a class's random character: 2-4 strokes, each a quadratic or cubic Bezier or a 3-5 point polyline."""
    rng = _generator(seed, _CHARACTER_STREAM, class_index)
    width = float(rng.uniform(*_WIDTH_RANGE))
    points: list[np.ndarray] = []
    index: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    strokes: list[tuple[int, int]] = []
    caps: list[int] = []
    ends: list[int] = []  # control points where strokes end, for later strokes to start from
    length = 0
    for _ in range(int(rng.integers(2, 5))):
        kind = _KINDS[int(rng.integers(len(_KINDS)))]
        count = kind + 1 if kind != _POLYLINE else int(rng.integers(3, 6))
        shared = [ends[int(rng.integers(len(ends)))]] if ends and rng.random() < _CONNECT_PROBABILITY else []
        controls = shared + list(range(len(points), len(points) + count - len(shared)))
        points.extend(rng.uniform(-_EXTENT, _EXTENT, size=(count - len(shared), 2)))
        ends.extend((controls[0], controls[-1]))
        if kind == _POLYLINE:
            index.append(np.repeat(np.array(controls)[:, None], 4, axis=1))
            weights.append(np.eye(1, 4).repeat(count, axis=0))
            caps.extend(range(length, length + count))
        else:
            index.append(np.array([controls + [controls[0]] * (3 - kind)] * _BEZIER_POINTS))
            weights.append(np.pad(_BASES[kind], ((0, 0), (0, 3 - kind))))
            caps.extend((length, length + _BEZIER_POINTS - 1))
        strokes.append((length, length + len(index[-1])))
        length = strokes[-1][1]
    return _Character(
        np.array(points), np.concatenate(index), np.concatenate(weights), tuple(strokes), tuple(caps), width
    )


def _render(character: _Character, rng: np.random.Generator, size: int, jitter: float) -> np.ndarray:
    """Draw one instance of a character with this instance's jitter; uint8 (1, size, size), ink 255."""
    draws = rng.uniform(-1.0, 1.0, size=6 + character.points.size)
    turn, grow, slant, move_x, move_y, thicken = (jitter * d for d in draws[:6].tolist())
    t = _TAN_HALF_ROTATION * turn
    cos, sin = (1.0 - t * t) / (1.0 + t * t), 2.0 * t / (1.0 + t * t)  # exact rotation without trigonometry
    scale = max(_MIN_SCALE, 1.0 + _SCALE * grow)
    shear = _SHEAR * slant
    # Shear, rotate, scale, shift, then map the [-1, 1] frame onto the canvas: one affine map.
    half = size * _SUPERSAMPLE / 2.0
    xx, xy = half * scale * cos, half * scale * (cos * shear - sin)
    yx, yy = half * scale * sin, half * scale * (sin * shear + cos)
    x0, y0 = half + half * _SHIFT * move_x, half + half * _SHIFT * move_y

    points = character.points + (_POINT_NOISE * jitter) * draws[6:].reshape(-1, 2)
    gathered = points[character.index]  # (path points, 4, 2)
    w = character.weights[:, :, None]
    path = w[:, 0] * gathered[:, 0] + w[:, 1] * gathered[:, 1]
    path = path + w[:, 2] * gathered[:, 2] + w[:, 3] * gathered[:, 3]
    x, y = path[:, 0], path[:, 1]
    canvas = np.stack([xx * x + xy * y + x0, yx * x + yy * y + y0], axis=1)
    pixels = np.rint(canvas).astype(np.int64).tolist()

    width = character.width * max(_MIN_SCALE, 1.0 + _WIDTH_CHANGE * thicken)
    pen = max(_SUPERSAMPLE, round(width * size * _SUPERSAMPLE / _REFERENCE_SIZE))  # at least a pixel, when small
    lead = pen // 2  # a cap's bounding box is inclusive: lead pixels before the point, pen - 1 - lead after
    image = Image.new("L", (size * _SUPERSAMPLE,) * 2, 0)
    draw = ImageDraw.Draw(image)
    for start, stop in character.strokes:
        draw.line([tuple(p) for p in pixels[start:stop]], fill=255, width=pen)
    # Round caps and joints: Pillow draws wide segments as rectangles, which leave notches at corners.
    for cap in character.caps:
        cx, cy = pixels[cap]
        draw.ellipse((cx - lead, cy - lead, cx - lead + pen - 1, cy - lead + pen - 1), fill=255)
    return np.array(image.reduce(_SUPERSAMPLE), dtype=np.uint8)[None]


@dataclass(frozen=True)
class _Glyphs:
    """``load`` and ``describe`` of a listing; a plain object, so ``load`` pickles to worker processes."""

    seed: int
    size: int
    jitter: float
    name_digits: int
    instance_digits: int

    def name(self, class_index: int) -> str:
        return f"glyph{class_index:0{self.name_digits}d}"

    colour: bool = False

    def load(self, item: Hashable) -> np.ndarray:
        class_index, instance_index = item  # type: ignore[misc]
        rng = _generator(self.seed, _INSTANCE_STREAM, class_index, instance_index)
        glyph = _render(_character(self.seed, class_index), rng, self.size, self.jitter)
        return self._paint(glyph, class_index, instance_index) if self.colour else glyph

    def _paint(self, glyph: np.ndarray, class_index: int, instance_index: int) -> np.ndarray:
        """(1, H, W) glyph coverage -> (3, H, W): ink over a noisy two-colour background, integer arithmetic only
        (random integers, +, -, *, //), so the bytes are the same on every platform."""
        ink = _generator(self.seed, _PALETTE_STREAM, class_index).integers(0, 256, 3)
        rng = _generator(self.seed, _PAINT_STREAM, class_index, instance_index)
        ink = np.clip(ink + rng.integers(-_INK_JITTER, _INK_JITTER + 1, 3), 0, 255)[:, None, None]
        left, right = rng.integers(0, 256, (2, 3, 1, 1))
        ramp = np.arange(self.size)[None, None, :]
        background = (left * (self.size - 1 - ramp) + right * ramp) // max(self.size - 1, 1)
        background = np.clip(background + rng.integers(-_NOISE, _NOISE + 1, (3, self.size, self.size)), 0, 255)
        coverage = glyph.astype(np.int64)
        return ((background * (255 - coverage) + ink * coverage) // 255).astype(np.uint8)

    def describe(self, item: Hashable) -> str:
        class_index, instance_index = item  # type: ignore[misc]
        return f"synthetic:{self.name(class_index)}#{instance_index:0{self.instance_digits}d}"


def _validate(
    classes: int, images_per_class: int, size: int, seed: int, jitter: float
) -> None:
    """Reject options that would give an empty, degenerate or unreproducible data set, naming the option."""
    if classes < 3:
        raise FsltoolError(f"synthetic: --classes must be at least 3 (one per split), got {classes}")
    if images_per_class < 1:
        raise FsltoolError(f"synthetic: --images-per-class must be at least 1, got {images_per_class}")
    if size < 8:
        raise FsltoolError(f"synthetic: --size must be at least 8, got {size}")
    if seed < 0:
        raise FsltoolError(f"synthetic: --seed must be a non-negative integer, got {seed}")
    if not jitter >= 0:  # also rejects NaN
        raise FsltoolError(f"synthetic: --jitter must be at least 0, got {jitter}")


def synthetic(
    *,
    classes: int = 1200,
    images_per_class: int = 20,
    size: int = 28,
    seed: int = 0,
    split_ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
    jitter: float = DEFAULT_JITTER,
    colour: bool = False,
) -> SourceListing:
    """List ``classes`` procedural glyph classes of ``images_per_class`` images each; images render on load.
    ``colour`` gives RGB images: each class's glyph in its own ink colour on varied, noisy backgrounds.

    ``jitter`` scales every per-instance variation (0 draws each class identically; 1 is Omniglot-like;
    larger is harder). Splits come from ``split_by_ratios``, shared with the folder source.
    """
    _validate(classes, images_per_class, size, seed, jitter)
    glyphs = _Glyphs(seed, size, jitter, max(4, len(str(classes - 1))), max(2, len(str(images_per_class - 1))), colour)
    split_of = split_by_ratios([glyphs.name(c) for c in range(classes)], split_ratios, seed)

    specs = [
        ClassSpec(glyphs.name(c), split_of[glyphs.name(c)], tuple((c, i) for i in range(images_per_class)))
        for c in range(classes)
    ]
    provenance = {
        "source": "synthetic",
        "version": _VERSION,
        "classes": classes,
        "images_per_class": images_per_class,
        "size": size,
        "seed": seed,
        "split_ratios": [float(r) for r in split_ratios],
        "jitter": float(jitter),
        "colour": colour,
    }
    return SourceListing(specs, (3 if colour else 1, size, size), glyphs.load, glyphs.describe, provenance)
