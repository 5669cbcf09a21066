"""Bundled Geometry3K-style problems with rendered diagrams, generated offline from a seed.

This module owns the sample data that the demo and the tests train and evaluate on without network:
the problem kinds (right-triangle sides, angle sum in a triangle, parallel lines cut by a transversal,
circle measures, similar triangles, isosceles base angles, vertical / linear-pair angles), their exact
answers in Geometry3K's answer forms (integers, decimals to the tenth, simplest radicals, fractions,
multiples of pi), the diagrams (drawn with PIL on a white canvas, values written on the figure), and the
instruction block that the processed geo3k dataset puts in front of every question.

``generate_problems`` is a pure function of its arguments: the same seed gives the same texts, answers
and image pixels. Each kind has a public builder that takes the mathematical parameters explicitly (so the
answers can be checked by hand) plus a ``random.Random`` that only chooses the layout (rotation,
letters, units). Writing parquet files is ``envs.geo3k.dataset``'s job.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, TypeVar

from PIL import Image, ImageDraw, ImageFont

from .dataset import IMAGE_PLACEHOLDER

DEFAULT_IMAGE_SIZE = 448

INSTRUCTION_BLOCK = (
    "Solve the geometry problem below, using the diagram in the image. "
    "Work through it step by step inside <think></think> before you commit to an answer. "
    "You can check a candidate answer with the calc_score tool. To call it, write exactly\n"
    '<tool_call>{"name": "calc_score", "arguments": {"answer": "<digits>"}}</tool_call>\n'
    "with your candidate in place of <digits>. The tool replies whether the candidate is correct; "
    "read its feedback, fix your reasoning if it says the candidate is wrong, and check again if you need to. "
    "When you are done, end your reply with a line of the form\n"
    "Answer: \\boxed{$Answer}\n"
    "where $Answer is the final value only, written as an integer, a decimal, or an exact expression "
    "such as 2\\sqrt{3}, \\frac{15}{2} or 16\\pi."
)

_POSITIVE_INT = r"[1-9]\d*"
_INT_AT_LEAST_2 = r"(?:[2-9]|[1-9]\d+)"
_FRACTION = rf"\\frac\{{{_POSITIVE_INT}\}}\{{{_INT_AT_LEAST_2}\}}"

# Geometry3K's answer forms, as exact spellings: a label that fits none of them is a generator bug.
ANSWER_FORM_PATTERNS: dict[str, re.Pattern[str]] = {
    "integer": re.compile(_POSITIVE_INT),
    "decimal": re.compile(r"(?:0|[1-9]\d*)\.[1-9]"),
    "sqrt": re.compile(rf"{_INT_AT_LEAST_2}?\\sqrt\{{{_INT_AT_LEAST_2}\}}"),
    "fraction": re.compile(_FRACTION),
    "pi": re.compile(rf"(?:{_INT_AT_LEAST_2}|{_FRACTION})?\\pi"),
}
ANSWER_FORMS: tuple[str, ...] = tuple(ANSWER_FORM_PATTERNS)

_LETTERS = "ABCDEFGHJKLMNPQRSTUVWYZ"  # no I, O or X: they read as 1, 0 and the unknown x
_UNITS = ("", "", " cm", " in.", " ft", " m", " mm", " yd")
_SUPERSAMPLE = 2  # drawn at twice the size and downsampled, so lines and text are anti-aliased
_INK = (0, 0, 0)
_MAX_DRAWS = 10_000

T = TypeVar("T")
Point = tuple[float, float]


@dataclass(frozen=True)
class GeoProblem:
    """One generated problem: the question (with its ``<image>`` placeholder), answer and diagram."""

    kind: str
    question: str
    answer: str
    answer_form: str
    image: Image.Image = field(compare=False, repr=False)
    signature: str  # the mathematical content (not the layout): equal signatures are the same problem

    @property
    def problem(self) -> str:
        """The full prompt text of the processed geo3k dataset: instruction block, then the question."""
        return format_problem(self.question)

    @property
    def images(self) -> tuple[Image.Image, ...]:
        return (self.image,)


def format_problem(question: str) -> str:
    return f"{INSTRUCTION_BLOCK}\n\n{question}"


def answer_form(answer: str) -> str:
    """The Geometry3K answer form of ``answer`` (one of ``ANSWER_FORMS``)."""
    for form, pattern in ANSWER_FORM_PATTERNS.items():
        if pattern.fullmatch(answer):
            return form
    raise ValueError(
        f"answer {answer!r} is in none of the forms {', '.join(ANSWER_FORMS)}; "
        "write it like 5, 12.5, 2\\sqrt{3}, \\frac{15}{2} or 16\\pi"
    )


# ---------------------------------------------------------------------------------------------------------
# Exact answer formatting


def format_rational(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def format_degrees(value: Fraction) -> str:
    """An exact angle: a terminating one-place decimal (54.5) where there is one, else a fraction."""
    if value.denominator == 1:
        return str(value.numerator)
    tenths = value * 10
    if tenths.denominator == 1:
        whole, rest = divmod(abs(tenths.numerator), 10)
        return f"{'-' if value < 0 else ''}{whole}.{rest}"
    return format_rational(value)


def format_radical(radicand: int) -> str:
    """sqrt(radicand) in simplest radical form: 12 -> 2\\sqrt{3}, 25 -> 5, 41 -> \\sqrt{41}."""
    if radicand < 1:
        raise ValueError(f"radicand must be a positive integer, got {radicand}")
    outside, inside = 1, radicand
    factor = 2
    while factor * factor <= inside:
        while inside % (factor * factor) == 0:
            inside //= factor * factor
            outside *= factor
        factor += 1
    if inside == 1:
        return str(outside)
    return f"{outside if outside > 1 else ''}\\sqrt{{{inside}}}"


def format_pi(coefficient: Fraction) -> str:
    if coefficient <= 0:
        raise ValueError(f"a multiple of pi here is a positive length or area, got {coefficient}")
    if coefficient == 1:
        return "\\pi"
    return f"{format_rational(coefficient)}\\pi"


def round_tenth(value: float) -> str:
    """``value`` rounded to the nearest tenth, written without a trailing ``.0`` (10.0 -> "10")."""
    scaled = value * 10
    # Float error on these magnitudes is ~1e-12; closer to a tie than 1e-9 the rounding is not trustworthy.
    if abs(scaled - (math.floor(scaled) + 0.5)) < 1e-9:
        raise ValueError(f"{value!r} is too close to a rounding tie to round to the tenth reliably")
    tenths = round(scaled)
    whole, rest = divmod(tenths, 10)
    return str(whole) if rest == 0 else f"{whole}.{rest}"


# ---------------------------------------------------------------------------------------------------------
# Angle labels: a*x + b degrees


@dataclass(frozen=True)
class Linear:
    """An angle written on a diagram as ``coef * x + const`` degrees; ``coef == 0`` is a plain number."""

    coef: int = 0
    const: int = 0

    @classmethod
    def number(cls, degrees: int) -> Linear:
        return cls(0, degrees)

    def at(self, x: Fraction) -> Fraction:
        return self.coef * x + self.const

    def label(self) -> str:
        if self.coef == 0:
            return f"{self.const}°"
        term = "x" if self.coef == 1 else f"{self.coef}x"
        if self.const == 0:
            return f"{term}°"
        sign = "+" if self.const > 0 else "-"
        return f"({term} {sign} {abs(self.const)})°"

    def __str__(self) -> str:
        return self.label()


def _solve_equal(first: Linear, second: Linear) -> Fraction:
    if first.coef == second.coef:
        raise ValueError(f"the labels {first} and {second} do not determine x (equal x-coefficients)")
    return Fraction(second.const - first.const, first.coef - second.coef)


def _solve_sum(labels: Sequence[Linear], total: int) -> Fraction:
    coef = sum(label.coef for label in labels)
    if coef == 0:
        raise ValueError(f"the labels {', '.join(map(str, labels))} do not determine x (no x in them)")
    return Fraction(total - sum(label.const for label in labels), coef)


def _check_angles(values: Sequence[Fraction], labels: Sequence[Linear], what: str) -> None:
    for value, label in zip(values, labels, strict=True):
        if not 0 < value < 180:
            raise ValueError(
                f"{what}: the angle labelled {label} comes out as {value} degrees, not in (0, 180)"
            )


# ---------------------------------------------------------------------------------------------------------
# Drawing


def _unit(degrees: float) -> Point:
    """Image-space unit vector for a direction given counter-clockwise on screen (y grows downwards)."""
    radians = math.radians(degrees)
    return (math.cos(radians), -math.sin(radians))


def _heading(origin: Point, target: Point) -> float:
    return math.degrees(math.atan2(origin[1] - target[1], target[0] - origin[0])) % 360


def _along(origin: Point, degrees: float, distance: float) -> Point:
    ux, uy = _unit(degrees)
    return (origin[0] + distance * ux, origin[1] + distance * uy)


def _midpoint(p: Point, q: Point) -> Point:
    return ((p[0] + q[0]) / 2, (p[1] + q[1]) / 2)


def _interior_wedge(vertex: Point, p: Point, q: Point) -> tuple[float, float]:
    """The counter-clockwise (start, end) headings of the angle p-vertex-q that is under 180 degrees."""
    a, b = _heading(vertex, p), _heading(vertex, q)
    return (a, b) if (b - a) % 360 < 180 else (b, a)


def _pose(points: Sequence[Point], rotation: float, mirror: bool) -> list[Point]:
    """Rotate (counter-clockwise, math axes) and optionally mirror points before fitting them."""
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    posed = [(x * c - y * s, x * s + y * c) for x, y in points]
    return [(-x, y) for x, y in posed] if mirror else posed


def _fit(points: Sequence[Point], box: tuple[float, float, float, float]) -> list[Point]:
    """Map math-axes points (y up) into the image box (left, top, right, bottom), uniformly scaled, centred."""
    left, top, right, bottom = box
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    width, height = max(xs) - min(xs), max(ys) - min(ys)
    scale = min((right - left) / max(width, 1e-9), (bottom - top) / max(height, 1e-9))
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    mx, my = (left + right) / 2, (top + bottom) / 2
    return [(mx + (x - cx) * scale, my - (y - cy) * scale) for x, y in points]


def _span(points: Sequence[Point]) -> tuple[float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (max(xs) - min(xs), max(ys) - min(ys))


def _boxes_at_common_scale(
    shapes: Sequence[Sequence[Point]], size: int, *, margin: float, gap: float
) -> list[tuple[float, float, float, float]]:
    """Image boxes for two shapes drawn at one scale, side by side or stacked, whichever is larger."""
    inner = size - 2 * margin
    cell = (inner - gap) / 2
    spans = [_span(shape) for shape in shapes]
    across = min(min(cell / w, inner / h) for w, h in spans)
    stacked = min(min(inner / w, cell / h) for w, h in spans)
    scale = max(across, stacked)
    boxes = []
    for i, (w, h) in enumerate(spans):
        offset = margin + i * (cell + gap) + cell / 2
        cx, cy = (offset, size / 2) if across >= stacked else (size / 2, offset)
        boxes.append((cx - w * scale / 2, cy - h * scale / 2, cx + w * scale / 2, cy + h * scale / 2))
    return boxes


class _Sketch:
    """A white canvas in logical pixels with the few marks geometry diagrams need."""

    def __init__(self, size: int) -> None:
        if size < 160:
            raise ValueError(f"image_size must be at least 160 pixels for the labels to fit, got {size}")
        self.size = size
        self.line_width = max(1, round(size / 224))
        self.gap = size * 0.012
        self._k = _SUPERSAMPLE
        self._image = Image.new("RGB", (size * self._k, size * self._k), "white")
        self._draw = ImageDraw.Draw(self._image)
        self._font = ImageFont.load_default(size=max(9, round(size * 0.038)) * self._k)

    def _px(self, p: Point) -> tuple[float, float]:
        return (p[0] * self._k, p[1] * self._k)

    def _width(self, scale: float) -> int:
        return max(1, round(self.line_width * scale * self._k))

    def segment(self, p: Point, q: Point, width: float = 1.0) -> None:
        self._draw.line([self._px(p), self._px(q)], fill=_INK, width=self._width(width))

    def polygon(self, points: Sequence[Point]) -> None:
        ring = [self._px(p) for p in [*points, points[0], points[1]]]
        self._draw.line(ring, fill=_INK, width=self._width(1.0), joint="curve")

    def circle(self, center: Point, radius: float) -> None:
        x, y = self._px(center)
        r = radius * self._k
        self._draw.ellipse((x - r, y - r, x + r, y + r), outline=_INK, width=self._width(1.0))

    def arc(self, center: Point, radius: float, start: float, end: float, width: float = 0.75) -> None:
        """An arc counter-clockwise (on screen) from heading ``start`` to heading ``end``."""
        x, y = self._px(center)
        r = radius * self._k
        # PIL measures angles clockwise on screen, so a counter-clockwise sweep start->end is -end..-start.
        self._draw.arc((x - r, y - r, x + r, y + r), -end, -start, fill=_INK, width=self._width(width))

    def dot(self, center: Point) -> None:
        x, y = self._px(center)
        r = self.line_width * 1.8 * self._k
        self._draw.ellipse((x - r, y - r, x + r, y + r), fill=_INK)

    def text_extent(self, text: str) -> tuple[float, float]:
        """Half width and half height of the text's ink box, in logical pixels."""
        x0, y0, x1, y1 = self._draw.textbbox((0, 0), text, font=self._font, anchor="mm")
        return ((x1 - x0) / (2 * self._k), (y1 - y0) / (2 * self._k))

    def text(self, center: Point, text: str) -> None:
        """Draw text with its ink box centred on ``center``, kept inside the canvas."""
        x0, y0, x1, y1 = self._draw.textbbox((0, 0), text, font=self._font, anchor="mm")
        hw, hh = (x1 - x0) / (2 * self._k), (y1 - y0) / (2 * self._k)
        cx = min(max(center[0], hw + 2), self.size - hw - 2)
        cy = min(max(center[1], hh + 2), self.size - hh - 2)
        origin = (cx * self._k - (x0 + x1) / 2, cy * self._k - (y0 + y1) / 2)
        self._draw.text(origin, text, fill=_INK, font=self._font, anchor="mm")

    def label_beside(self, anchor: Point, heading: float, text: str, gap: float | None = None) -> None:
        """Text whose box starts ``gap`` away from ``anchor`` in direction ``heading``."""
        hw, hh = self.text_extent(text)
        ux, uy = _unit(heading)
        reach = (self.gap if gap is None else gap) + hw * abs(ux) + hh * abs(uy)
        self.text((anchor[0] + reach * ux, anchor[1] + reach * uy), text)

    def label_in_wedge(self, vertex: Point, start: float, end: float, text: str, min_distance: float) -> None:
        """Text inside the angle from heading ``start`` counter-clockwise to ``end``, clear of both sides."""
        span = (end - start) % 360
        half = math.radians(span / 2)
        hw, hh = self.text_extent(text)
        bisector = start + span / 2
        ux, uy = _unit(bisector)
        # min_distance is measured to the near edge of the box, so the text never overlaps an angle arc.
        distance = min_distance + hw * abs(ux) + hh * abs(uy)
        for side in (start, end):
            # The box clears the side's line once its centre is further from the line than the box's
            # half-extent along the line's normal; the centre's distance grows as distance * sin(half).
            normal_x, normal_y = abs(math.sin(math.radians(side))), abs(math.cos(math.radians(side)))
            needed = (hw * normal_x + hh * normal_y + self.gap) / max(math.sin(half), 1e-3)
            distance = max(distance, needed)
        self.text(_along(vertex, bisector, distance), text)

    def angle_mark(self, vertex: Point, start: float, end: float, text: str) -> None:
        radius = self.size * 0.045
        self.arc(vertex, radius, start, end)
        self.label_in_wedge(vertex, start, end, text, radius + self.gap * 0.5)

    def right_angle_mark(self, vertex: Point, first: float, second: float) -> None:
        side = self.size * 0.04
        p, q = _along(vertex, first, side), _along(vertex, second, side)
        corner = (p[0] + q[0] - vertex[0], p[1] + q[1] - vertex[1])
        self.segment(p, corner, 0.75)
        self.segment(corner, q, 0.75)

    def tick_marks(self, p: Point, q: Point, count: int = 1) -> None:
        heading = _heading(p, q)
        mid = _midpoint(p, q)
        half, spacing = self.size * 0.018, self.size * 0.012
        for i in range(count):
            centre = _along(mid, heading, (i - (count - 1) / 2) * spacing)
            self.segment(_along(centre, heading + 90, half), _along(centre, heading - 90, half), 0.75)

    def arrow_mark(self, at: Point, heading: float) -> None:
        """The chevron that marks a line as parallel to another, pointing along ``heading``."""
        length = self.size * 0.025
        self.segment(at, _along(at, heading + 150, length), 0.9)
        self.segment(at, _along(at, heading - 150, length), 0.9)

    def image(self) -> Image.Image:
        return self._image.resize((self.size, self.size), Image.Resampling.LANCZOS)


def _draw_triangle(
    sketch: _Sketch,
    points: Sequence[Point],
    *,
    letters: Sequence[str] | None = None,
    side_labels: dict[int, str] | None = None,
    angle_labels: dict[int, str] | None = None,
    right_angle_at: int | None = None,
    ticks: dict[int, int] | None = None,
) -> None:
    """Side ``i`` runs from ``points[i]`` to ``points[i + 1]``; angle ``i`` is at ``points[i]``."""
    sketch.polygon(points)
    for i, text in (side_labels or {}).items():
        p, q, opposite = points[i], points[(i + 1) % 3], points[(i + 2) % 3]
        heading = _heading(p, q)
        mid = _midpoint(p, q)
        outward = heading + 90
        probe = _along(mid, outward, 1.0)
        if math.dist(probe, opposite) < math.dist(mid, opposite):
            outward = heading - 90
        sketch.label_beside(mid, outward, text)
    for i, count in (ticks or {}).items():
        sketch.tick_marks(points[i], points[(i + 1) % 3], count)
    for i, vertex in enumerate(points):
        start, end = _interior_wedge(vertex, points[i - 1], points[(i + 1) % 3])
        if i == right_angle_at:
            sketch.right_angle_mark(vertex, start, end)
        if angle_labels and i in angle_labels:
            sketch.angle_mark(vertex, start, end, angle_labels[i])
        if letters:
            sketch.label_beside(vertex, start + ((end - start) % 360) / 2 + 180, letters[i])


def _triangle_from_sides(ab: float, bc: float, ca: float) -> list[Point]:
    cx = (ca * ca + ab * ab - bc * bc) / (2 * ab)
    return [(0.0, 0.0), (ab, 0.0), (cx, math.sqrt(max(ca * ca - cx * cx, 0.0)))]


def _triangle_from_angles(at_a: float, at_b: float) -> list[Point]:
    at_c = 180 - at_a - at_b
    ac = math.sin(math.radians(at_b)) / math.sin(math.radians(at_c))
    return [(0.0, 0.0), (1.0, 0.0), (ac * math.cos(math.radians(at_a)), ac * math.sin(math.radians(at_a)))]


def _triangle_angles(ab: float, bc: float, ca: float) -> tuple[float, float, float]:
    def opposite(side: float, x: float, y: float) -> float:
        return math.degrees(math.acos(max(-1.0, min(1.0, (x * x + y * y - side * side) / (2 * x * y)))))

    return (opposite(bc, ab, ca), opposite(ca, ab, bc), opposite(ab, bc, ca))


def _region_wedges(theta: float) -> tuple[tuple[float, float], ...]:
    """The four angles around a crossing of a line at heading 0 and one at heading ``theta``.

    Region 0 is above-right (measure theta), 1 above-left (180 - theta), 2 below-left (theta),
    3 below-right (180 - theta); "above" is the side the heading-``theta`` ray points to.
    """
    return ((0.0, theta), (theta, 180.0), (180.0, 180.0 + theta), (180.0 + theta, 360.0))


def _letters(rng: random.Random, count: int) -> list[str]:
    return rng.sample(_LETTERS, count)


# ---------------------------------------------------------------------------------------------------------
# Problem builders: explicit mathematical parameters in, problem out. ``rng`` only picks the layout.


def right_triangle_problem(
    leg: int,
    other: int,
    *,
    unknown: Literal["hypotenuse", "leg"],
    radical: bool,
    rng: random.Random,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> GeoProblem:
    """A right triangle with two sides given and the third, x, asked (Pythagoras).

    ``unknown="hypotenuse"``: the legs are ``leg`` and ``other``. ``unknown="leg"``: ``leg`` is one leg and
    ``other`` the hypotenuse. The answer is an integer when exact, else in simplest radical form
    (``radical``) or rounded to the tenth.
    """
    if leg <= 0 or other <= 0:
        raise ValueError(f"side lengths must be positive, got {leg} and {other}")
    legs: tuple[int, int | None]
    if unknown == "hypotenuse":
        radicand, legs = leg * leg + other * other, (leg, other)
    elif unknown == "leg":
        if other <= leg:
            raise ValueError(f"the hypotenuse ({other}) must be longer than the leg ({leg})")
        radicand, legs = other * other - leg * leg, (leg, None)
    else:
        raise ValueError(f"unknown must be 'hypotenuse' or 'leg', got {unknown!r}")
    if radical:
        answer, instruction = format_radical(radicand), "Write your answer in simplest radical form."
    else:
        answer, instruction = round_tenth(math.sqrt(radicand)), "Round to the nearest tenth, if necessary."

    unit = rng.choice(_UNITS)
    hyp_label = "x" if unknown == "hypotenuse" else f"{other}{unit}"
    lengths = [float(legs[0]), math.sqrt(radicand) if legs[1] is None else float(legs[1])]
    labels = [f"{legs[0]}{unit}", "x" if legs[1] is None else f"{legs[1]}{unit}"]
    if rng.random() < 0.5:
        lengths.reverse()
        labels.reverse()
    # Vertices: right angle, end of the first leg, end of the second leg.
    shape = [(0.0, 0.0), (lengths[0], 0.0), (0.0, lengths[1])]
    sketch = _Sketch(image_size)
    margin = image_size * 0.16
    points = _fit(
        _pose(shape, rng.uniform(0, 360), rng.random() < 0.5),
        (margin, margin, image_size - margin, image_size - margin),
    )
    _draw_triangle(
        sketch,
        points,
        letters=_letters(rng, 3),
        side_labels={0: labels[0], 1: hyp_label, 2: labels[1]},
        right_angle_at=0,
    )
    return _problem(
        "right_triangle",
        f"Find x. {instruction}",
        answer,
        sketch,
        f"right_triangle|{unknown}|{leg}|{other}|{'radical' if radical else 'decimal'}",
    )


def triangle_angle_sum_problem(
    labels: tuple[Linear, Linear, Linear],
    *,
    find_vertex: int | None = None,
    rng: random.Random,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> GeoProblem:
    """A triangle with its three angles labelled (numbers or expressions in x); the angles sum to 180.

    Asks for x, or with ``find_vertex`` for the measure of that vertex's angle.
    """
    x = _solve_sum(labels, 180)
    values = [label.at(x) for label in labels]
    _check_angles(values, labels, "triangle angle sum")
    letters = _letters(rng, 3)
    if find_vertex is None:
        question, answer = "Find x.", format_degrees(x)
    else:
        question, answer = f"Find m\\angle {letters[find_vertex]}.", format_degrees(values[find_vertex])
    shape = _triangle_from_angles(float(values[0]), float(values[1]))
    sketch = _Sketch(image_size)
    margin = image_size * 0.1
    points = _fit(
        _pose(shape, rng.uniform(0, 360), rng.random() < 0.5),
        (margin, margin, image_size - margin, image_size - margin),
    )
    _draw_triangle(
        sketch, points, letters=letters, angle_labels={i: str(label) for i, label in enumerate(labels)}
    )
    signature = f"triangle_angle_sum|{'|'.join(f'{lab.coef},{lab.const}' for lab in labels)}|{find_vertex}"
    return _problem("triangle_angle_sum", question, answer, sketch, signature)


_PARALLEL_RELATIONS: dict[str, tuple[tuple[int, int], ...]] = {
    # (region at the crossing with line p, region at the crossing with line q); see _region_wedges.
    "corresponding": ((0, 0), (1, 1), (2, 2), (3, 3)),
    "alternate_interior": ((2, 0), (3, 1)),
    "alternate_exterior": ((1, 3), (0, 2)),
    "consecutive_interior": ((2, 1), (3, 0)),
}
PARALLEL_RELATIONS: tuple[str, ...] = tuple(_PARALLEL_RELATIONS)


def parallel_lines_problem(
    relation: str,
    at_p: Linear,
    at_q: Linear,
    *,
    rng: random.Random,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> GeoProblem:
    """Parallel lines p and q cut by a transversal t; one angle labelled at each crossing; find x.

    Corresponding, alternate interior and alternate exterior angles are equal; consecutive interior
    angles are supplementary.
    """
    if relation not in _PARALLEL_RELATIONS:
        raise ValueError(f"relation must be one of {', '.join(PARALLEL_RELATIONS)}, got {relation!r}")
    if relation == "consecutive_interior":
        x = _solve_sum((at_p, at_q), 180)
    else:
        x = _solve_equal(at_p, at_q)
    values = (at_p.at(x), at_q.at(x))
    _check_angles(values, (at_p, at_q), f"{relation} angles")
    region_p, region_q = rng.choice(_PARALLEL_RELATIONS[relation])
    theta = float(values[0]) if region_p % 2 == 0 else 180 - float(values[0])

    size = image_size
    sketch = _Sketch(size)
    y_p, y_q = size * rng.uniform(0.33, 0.38), size * rng.uniform(0.62, 0.67)
    shift = (y_q - y_p) / math.tan(math.radians(theta))
    cross_p = (size / 2 + shift / 2, y_p)
    cross_q = (size / 2 - shift / 2, y_q)
    left, right = size * 0.05, size * 0.95
    for y, name in ((y_p, "p"), (y_q, "q")):
        sketch.segment((left, y), (right, y))
        sketch.arrow_mark((size * 0.2, y), 0.0)
        sketch.label_beside((right, y), 90.0, name, gap=sketch.gap * 0.5)
    reach = size * 0.26
    top, bottom = _along(cross_p, theta, reach), _along(cross_q, theta + 180, reach)
    sketch.segment(bottom, top)
    sketch.label_beside(top, theta - 90, "t")
    wedges = _region_wedges(theta)
    sketch.angle_mark(cross_p, *wedges[region_p], str(at_p))
    sketch.angle_mark(cross_q, *wedges[region_q], str(at_q))
    signature = f"parallel_lines|{relation}|{at_p.coef},{at_p.const}|{at_q.coef},{at_q.const}"
    return _problem(
        "parallel_lines", "In the figure, p \\parallel q. Find x.", format_degrees(x), sketch, signature
    )


CIRCLE_MEASURES: tuple[str, ...] = ("circumference", "area", "arc_length")


def circle_problem(
    measure: Literal["circumference", "area", "arc_length"],
    radius: int,
    *,
    given: Literal["radius", "diameter"],
    exact: bool,
    central_angle: int | None = None,
    rng: random.Random,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> GeoProblem:
    """A circle with its radius or diameter labelled; find the circumference, area or an arc's length.

    ``exact`` asks for the answer in terms of pi (``16\\pi``), otherwise rounded to the tenth.
    ``central_angle`` (degrees) is required for ``arc_length``.
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if given not in ("radius", "diameter"):
        raise ValueError(f"given must be 'radius' or 'diameter', got {given!r}")
    if measure == "circumference":
        coefficient = Fraction(2 * radius)
    elif measure == "area":
        coefficient = Fraction(radius * radius)
    elif measure == "arc_length":
        if central_angle is None or not 0 < central_angle < 180:
            raise ValueError(f"arc_length needs a central_angle in (0, 180) degrees, got {central_angle!r}")
        if given != "radius":
            raise ValueError("arc_length problems label the radius (the drawn radii bound the central angle)")
        coefficient = Fraction(central_angle * radius, 180)
    else:
        raise ValueError(f"measure must be one of {', '.join(CIRCLE_MEASURES)}, got {measure!r}")
    if exact:
        answer, instruction = format_pi(coefficient), "Express your answer in terms of \\pi."
    else:
        answer, instruction = round_tenth(float(coefficient) * math.pi), "Round to the nearest tenth."

    size = image_size
    sketch = _Sketch(size)
    center_letter, a_letter, b_letter = _letters(rng, 3)
    center, big_r = (size / 2, size / 2), size * 0.34
    sketch.circle(center, big_r)
    sketch.dot(center)
    start = rng.uniform(0, 360)
    length_label = f"{2 * radius if given == 'diameter' else radius}{rng.choice(_UNITS)}"
    a_point = _along(center, start, big_r)
    if measure == "arc_length":
        assert central_angle is not None
        end = start + central_angle
        b_point = _along(center, end, big_r)
        sketch.segment(center, a_point)
        sketch.segment(center, b_point)
        sketch.arc(center, big_r, start, end, width=2.5)
        sketch.angle_mark(center, start, end, f"{central_angle}°")
        sketch.label_beside(_midpoint(center, a_point), start - 90, length_label)
        sketch.label_beside(a_point, start, a_letter)
        sketch.label_beside(b_point, end, b_letter)
        sketch.label_beside(center, start + central_angle / 2 + 180, center_letter)
        target = f"the length of \\widehat{{{a_letter}{b_letter}}}"
    elif given == "diameter":
        b_point = _along(center, start + 180, big_r)
        sketch.segment(b_point, a_point)
        sketch.label_beside(_along(center, start, big_r * 0.5), start + 90, length_label)
        sketch.label_beside(center, start - 90, center_letter)
        sketch.label_beside(a_point, start, a_letter)
        sketch.label_beside(b_point, start + 180, b_letter)
        target = f"the {measure} of \\odot {center_letter}"
    else:
        sketch.segment(center, a_point)
        sketch.label_beside(_midpoint(center, a_point), start + 90, length_label)
        sketch.label_beside(center, start + 180, center_letter)
        sketch.label_beside(a_point, start, a_letter)
        target = f"the {measure} of \\odot {center_letter}"
    signature = f"circle|{measure}|{radius}|{given}|{central_angle}|{'exact' if exact else 'decimal'}"
    return _problem("circle", f"Find {target}. {instruction}", answer, sketch, signature)


def similar_triangles_problem(
    sides: tuple[int, int, int],
    scale: Fraction,
    *,
    known: int,
    unknown: int,
    scaled: Literal["first", "second"],
    rng: random.Random,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> GeoProblem:
    """Two similar triangles: one with integer ``sides`` (side i runs from vertex i to vertex i + 1), the
    other ``scale`` times it. Side ``known`` is labelled in both; side ``unknown`` is labelled in the base
    triangle and is x in the scaled one, so x = scale * sides[unknown].
    """
    a, b, c = sides
    if min(sides) <= 0 or a + b <= c or b + c <= a or c + a <= b:
        raise ValueError(f"sides {sides} do not form a triangle")
    if scale <= 0 or scale == 1:
        raise ValueError(f"scale must be a positive ratio other than 1, got {scale}")
    if known == unknown or {known, unknown} - {0, 1, 2}:
        raise ValueError(
            f"known and unknown must be two different side indices in 0..2, got {known}, {unknown}"
        )
    if (scale * sides[known]).denominator != 1:
        raise ValueError(
            f"the scaled known side {scale} * {sides[known]} must be a whole number to be labelled"
        )
    if scaled not in ("first", "second"):
        raise ValueError(f"scaled must be 'first' or 'second', got {scaled!r}")
    answer = format_rational(scale * sides[unknown])

    unit = rng.choice(_UNITS)
    base_labels = {known: f"{sides[known]}{unit}", unknown: f"{sides[unknown]}{unit}"}
    scaled_labels = {known: f"{scale * sides[known]}{unit}", unknown: "x"}
    first_scale, second_scale = (float(scale), 1.0) if scaled == "first" else (1.0, float(scale))
    first_labels, second_labels = (
        (scaled_labels, base_labels) if scaled == "first" else (base_labels, scaled_labels)
    )
    # Drawn sizes keep which triangle is larger, but never let one shrink to an unreadable size.
    display = min(max(second_scale / first_scale, 0.6), 1.6)
    mirror, rotation = rng.random() < 0.5, rng.uniform(-20, 20)
    base_shape = _pose(_triangle_from_sides(*map(float, sides)), rotation, mirror)
    shapes = [base_shape, [(x * display, y * display) for x, y in base_shape]]

    size = image_size
    sketch = _Sketch(size)
    letters = _letters(rng, 6)
    boxes = _boxes_at_common_scale(shapes, size, margin=size * 0.11, gap=size * 0.1)
    for shape, box, labels, names in zip(
        shapes, boxes, (first_labels, second_labels), (letters[:3], letters[3:]), strict=True
    ):
        _draw_triangle(sketch, _fit(shape, box), letters=names, side_labels=labels)
    first, second = "".join(letters[:3]), "".join(letters[3:])
    signature = f"similar_triangles|{a},{b},{c}|{scale}|{known}|{unknown}|{scaled}"
    return _problem(
        "similar_triangles",
        f"\\triangle {first} \\sim \\triangle {second}. Find x.",
        answer,
        sketch,
        signature,
    )


def isosceles_triangle_problem(
    apex: Linear | None,
    base_left: Linear | None,
    base_right: Linear | None = None,
    *,
    rng: random.Random,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> GeoProblem:
    """An isosceles triangle (legs marked congruent) with exactly two of its angles labelled; find x.

    Labelled base angles are equal to each other; apex + 2 * base = 180.
    """
    labelled = [label for label in (apex, base_left, base_right) if label is not None]
    if len(labelled) != 2:
        raise ValueError(f"label exactly two of the three angles, got {len(labelled)}")
    if apex is None:
        assert base_left is not None and base_right is not None
        x = _solve_equal(base_left, base_right)
        base = base_left.at(x)
        apex_value = 180 - 2 * base
    else:
        base_label = base_left if base_left is not None else base_right
        assert base_label is not None
        x = _solve_sum((apex, base_label, base_label), 180)
        apex_value, base = apex.at(x), base_label.at(x)
    # 0 < base < 90 is the same condition as 0 < apex < 180, since apex + 2 * base = 180.
    if not 0 < base < 90:
        raise ValueError(
            f"isosceles triangle: the base angles come out as {base} and the apex as {apex_value} degrees"
        )

    letters = _letters(rng, 3)
    top, left, right = letters
    height = math.tan(math.radians(float(base)))
    shape = [(0.0, height), (-1.0, 0.0), (1.0, 0.0)]
    size = image_size
    margin = size * 0.1
    sketch = _Sketch(size)
    points = _fit(
        _pose(shape, rng.uniform(-12, 12), rng.random() < 0.5), (margin, margin, size - margin, size - margin)
    )
    angle_labels = {
        i: str(label) for i, label in enumerate((apex, base_left, base_right)) if label is not None
    }
    _draw_triangle(sketch, points, letters=letters, angle_labels=angle_labels, ticks={0: 1, 2: 1})
    question = f"In \\triangle {top}{left}{right}, \\overline{{{top}{left}}} \\cong \\overline{{{top}{right}}}. Find x."
    parts = [
        "-" if label is None else f"{label.coef},{label.const}" for label in (apex, base_left, base_right)
    ]
    return _problem(
        "isosceles_triangle", question, format_degrees(x), sketch, f"isosceles_triangle|{'|'.join(parts)}"
    )


ANGLE_PAIR_RELATIONS: tuple[str, ...] = ("vertical", "linear_pair")


def angle_pair_problem(
    relation: Literal["vertical", "linear_pair"],
    first: Linear,
    second: Linear,
    *,
    rng: random.Random,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> GeoProblem:
    """Two crossing lines with two of the four angles labelled: vertical angles are equal, a linear
    pair sums to 180. Find x."""
    if relation == "vertical":
        x = _solve_equal(first, second)
        pairs: tuple[tuple[int, int], ...] = ((0, 2), (1, 3), (2, 0), (3, 1))
    elif relation == "linear_pair":
        x = _solve_sum((first, second), 180)
        pairs = ((0, 1), (1, 2), (2, 3), (3, 0))
    else:
        raise ValueError(f"relation must be one of {', '.join(ANGLE_PAIR_RELATIONS)}, got {relation!r}")
    values = (first.at(x), second.at(x))
    _check_angles(values, (first, second), f"{relation} angles")
    region_first, region_second = rng.choice(pairs)
    theta = float(values[0]) if region_first % 2 == 0 else 180 - float(values[0])

    size = image_size
    sketch = _Sketch(size)
    center, reach, tilt = (size / 2, size / 2), size * 0.42, rng.uniform(-25, 25)
    for heading in (tilt, tilt + theta):
        sketch.segment(_along(center, heading, reach), _along(center, heading + 180, reach))
    sketch.dot(center)
    wedges = _region_wedges(theta)
    for region, label in ((region_first, first), (region_second, second)):
        start, end = wedges[region]
        sketch.angle_mark(center, start + tilt, end + tilt, str(label))
    signature = f"angle_pair|{relation}|{first.coef},{first.const}|{second.coef},{second.const}"
    return _problem("angle_pair", "Find x.", format_degrees(x), sketch, signature)


def _problem(kind: str, question_text: str, answer: str, sketch: _Sketch, signature: str) -> GeoProblem:
    return GeoProblem(
        kind=kind,
        question=f"{IMAGE_PLACEHOLDER}{question_text}",
        answer=answer,
        answer_form=answer_form(answer),
        image=sketch.image(),
        signature=signature,
    )


# ---------------------------------------------------------------------------------------------------------
# Samplers: draw mathematical parameters for a builder. Each returns None to ask for another draw.

_PYTHAGOREAN_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (20, 21, 29), (12, 35, 37))


def _draw_until(rng: random.Random, propose: Callable[[random.Random], T | None], what: str) -> T:
    for _ in range(_MAX_DRAWS):
        result = propose(rng)
        if result is not None:
            return result
    raise RuntimeError(f"no valid {what} in {_MAX_DRAWS} draws; the sampler's ranges cannot be satisfied")


def _expression_for(rng: random.Random, value: int, x: int, *, max_coef: int = 5) -> Linear | None:
    """A label a*x + b that equals ``value`` at ``x``, with a small offset b, or None."""
    options = [coef for coef in range(1, max_coef + 1) if -40 <= value - coef * x <= 80]
    if not options:
        return None
    coef = rng.choice(options)
    return Linear(coef, value - coef * x)


def _sample_right_triangle(rng: random.Random) -> dict:
    unknown = rng.choice(("hypotenuse", "leg"))
    form = rng.choice(("integer", "sqrt", "decimal"))
    if form == "integer":
        p, q, r = rng.choice(_PYTHAGOREAN_TRIPLES)
        k = rng.randint(1, max(1, 45 // r))
        legs = [p * k, q * k]
        rng.shuffle(legs)
        other = legs[1] if unknown == "hypotenuse" else r * k
        return {"leg": legs[0], "other": other, "unknown": unknown, "radical": False}

    def propose(rng: random.Random) -> dict | None:
        leg = rng.randint(2, 16)
        other = rng.randint(2, 16) if unknown == "hypotenuse" else rng.randint(leg + 1, 3 * leg)
        radicand = leg * leg + other * other if unknown == "hypotenuse" else other * other - leg * leg
        if math.isqrt(radicand) ** 2 == radicand:
            return None
        drawn_legs = (leg, other) if unknown == "hypotenuse" else (leg, math.sqrt(radicand))
        if max(drawn_legs) / min(drawn_legs) > 3:
            return None
        if form == "decimal" and answer_form(round_tenth(math.sqrt(radicand))) != "decimal":
            return None
        return {"leg": leg, "other": other, "unknown": unknown, "radical": form == "sqrt"}

    return _draw_until(rng, propose, "right triangle")


def _sample_triangle_angle_sum(rng: random.Random) -> dict:
    def propose(rng: random.Random) -> dict | None:
        first = rng.randint(30, 110)
        second = rng.randint(30, 150 - first)
        angles = [first, second, 180 - first - second]
        if min(angles) < 30:
            return None
        if rng.random() < 0.5:
            labels = [Linear.number(a) for a in angles]
            labels[rng.randrange(3)] = Linear(1, 0)
            return {"labels": tuple(labels), "find_vertex": None}
        x = rng.randint(4, 25)
        with_x = rng.sample(range(3), rng.choice((2, 3)))
        labels = []
        for i, angle in enumerate(angles):
            label = _expression_for(rng, angle, x, max_coef=4) if i in with_x else Linear.number(angle)
            if label is None:
                return None
            labels.append(label)
        find_vertex = rng.choice([None, *with_x])
        return {"labels": tuple(labels), "find_vertex": find_vertex}

    return _draw_until(rng, propose, "triangle angle sum")


def _sample_pair_labels(
    rng: random.Random, first_value: int, second_value: int
) -> tuple[Linear, Linear] | None:
    """Labels for two related angles: one number and one expression, or two expressions."""
    x = rng.randint(4, 30)
    if rng.random() < 0.6:
        expression = _expression_for(rng, second_value, x)
        if expression is None:
            return None
        pair = (Linear.number(first_value), expression)
        return pair if rng.random() < 0.5 else (pair[1], pair[0])
    first, second = _expression_for(rng, first_value, x), _expression_for(rng, second_value, x)
    if first is None or second is None or first.coef == second.coef:
        return None
    return first, second


def _sample_parallel_lines(rng: random.Random) -> dict:
    def propose(rng: random.Random) -> dict | None:
        relation = rng.choice(PARALLEL_RELATIONS)
        value = rng.randint(40, 140)
        if 82 <= value <= 98:
            return None
        other = 180 - value if relation == "consecutive_interior" else value
        labels = _sample_pair_labels(rng, value, other)
        if labels is None:
            return None
        return {"relation": relation, "at_p": labels[0], "at_q": labels[1]}

    return _draw_until(rng, propose, "parallel lines")


def _sample_circle(rng: random.Random) -> dict:
    measure = rng.choice(CIRCLE_MEASURES)
    exact = rng.random() < 0.5

    def propose(rng: random.Random) -> dict | None:
        radius = rng.randint(2, 15)
        given = "radius" if measure == "arc_length" else rng.choice(("radius", "diameter"))
        angle = (
            rng.choice((30, 40, 45, 60, 72, 75, 80, 100, 105, 110, 120, 135, 150))
            if measure == "arc_length"
            else None
        )
        if measure == "circumference":
            coefficient = Fraction(2 * radius)
        elif measure == "area":
            coefficient = Fraction(radius * radius)
        else:
            assert angle is not None
            coefficient = Fraction(angle * radius, 180)
        if exact and coefficient.denominator != 1:
            return None
        if not exact and answer_form(round_tenth(float(coefficient) * math.pi)) != "decimal":
            return None
        return {"measure": measure, "radius": radius, "given": given, "exact": exact, "central_angle": angle}

    return _draw_until(rng, propose, "circle")


def _sample_similar_triangles(rng: random.Random) -> dict:
    want_fraction = rng.random() < 0.5

    def propose(rng: random.Random) -> dict | None:
        sides = (rng.randint(3, 14), rng.randint(3, 14), rng.randint(3, 14))
        a, b, c = sides
        if a + b <= c or b + c <= a or c + a <= b or min(_triangle_angles(*sides)) < 25:
            return None
        scale = Fraction(rng.randint(1, 6), rng.randint(1, 6))
        if scale == 1 or not Fraction(2, 5) <= scale <= Fraction(5, 2):
            return None
        known, unknown = rng.sample(range(3), 2)
        if (scale * sides[known]).denominator != 1:
            return None
        if ((scale * sides[unknown]).denominator != 1) != want_fraction:
            return None
        scaled = rng.choice(("first", "second"))
        return {"sides": sides, "scale": scale, "known": known, "unknown": unknown, "scaled": scaled}

    return _draw_until(rng, propose, "similar triangles")


def _sample_isosceles_triangle(rng: random.Random) -> dict:
    def propose(rng: random.Random) -> dict | None:
        variant = rng.choice(("apex_given", "base_given", "base_expressions"))
        if variant == "apex_given":
            apex = rng.randint(24, 130)
            base_label = Linear(1, 0)
            on_left = rng.random() < 0.5
            return {
                "apex": Linear.number(apex),
                "base_left": base_label if on_left else None,
                "base_right": None if on_left else base_label,
            }
        base = rng.randint(28, 76)
        if variant == "base_given":
            return {"apex": Linear(1, 0), "base_left": Linear.number(base), "base_right": None}
        x = rng.randint(4, 25)
        left, right = _expression_for(rng, base, x), _expression_for(rng, base, x)
        if left is None or right is None or left.coef == right.coef:
            return None
        return {"apex": None, "base_left": left, "base_right": right}

    return _draw_until(rng, propose, "isosceles triangle")


def _sample_angle_pair(rng: random.Random) -> dict:
    def propose(rng: random.Random) -> dict | None:
        relation = rng.choice(ANGLE_PAIR_RELATIONS)
        value = rng.randint(35, 145)
        if 84 <= value <= 96:
            return None
        other = value if relation == "vertical" else 180 - value
        labels = _sample_pair_labels(rng, value, other)
        if labels is None:
            return None
        return {"relation": relation, "first": labels[0], "second": labels[1]}

    return _draw_until(rng, propose, "angle pair")


_KINDS: dict[str, tuple[Callable[[random.Random], dict], Callable[..., GeoProblem]]] = {
    "right_triangle": (_sample_right_triangle, right_triangle_problem),
    "triangle_angle_sum": (_sample_triangle_angle_sum, triangle_angle_sum_problem),
    "parallel_lines": (_sample_parallel_lines, parallel_lines_problem),
    "circle": (_sample_circle, circle_problem),
    "similar_triangles": (_sample_similar_triangles, similar_triangles_problem),
    "isosceles_triangle": (_sample_isosceles_triangle, isosceles_triangle_problem),
    "angle_pair": (_sample_angle_pair, angle_pair_problem),
}
PROBLEM_KINDS: tuple[str, ...] = tuple(_KINDS)


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        close = difflib.get_close_matches(kind, PROBLEM_KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown problem kind {kind!r}; choose from {', '.join(PROBLEM_KINDS)}.{hint}")


def generate_problem(rng: random.Random, kind: str, *, image_size: int = DEFAULT_IMAGE_SIZE) -> GeoProblem:
    """One problem of ``kind`` with parameters and layout drawn from ``rng``."""
    _check_kind(kind)
    sample, build = _KINDS[kind]
    return build(**sample(rng), rng=rng, image_size=image_size)


def generate_problems(
    n: int,
    seed: int,
    *,
    kinds: Sequence[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    exclude: Sequence[str] | frozenset[str] = frozenset(),
) -> list[GeoProblem]:
    """``n`` distinct problems, a pure function of ``seed``: kinds cycle in order (balanced counts).

    Problems are distinct by ``signature`` (the mathematical content, not the layout), and none has a
    signature in ``exclude`` (pass the training split's signatures to keep a test split disjoint).
    Attempt ``i`` draws from its own ``random.Random`` seeded with ``(seed, i)``, so a longer list starts
    with the shorter one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chosen = tuple(PROBLEM_KINDS if kinds is None else kinds)
    if not chosen:
        raise ValueError("kinds is empty; pass at least one of " + ", ".join(PROBLEM_KINDS))
    for kind in chosen:
        _check_kind(kind)
    seen = set(exclude)
    problems: list[GeoProblem] = []
    max_attempts = 50 * n + 100
    for attempt in range(max_attempts):
        if len(problems) == n:
            break
        rng = random.Random(f"geo3k-sample:{seed}:{attempt}")
        problem = generate_problem(rng, chosen[len(problems) % len(chosen)], image_size=image_size)
        if problem.signature in seen:
            continue
        seen.add(problem.signature)
        problems.append(problem)
    if len(problems) < n:
        raise RuntimeError(
            f"only {len(problems)} of {n} distinct problems after {max_attempts} attempts for kinds "
            f"{', '.join(chosen)}; ask for fewer problems or more kinds"
        )
    return problems
