"""The bundled sample problems: determinism, answer forms, hand-checked answers, diagrams."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from fractions import Fraction

import pytest
from math_verify import parse, verify

from envs.geo3k.dataset import parse_answer
from envs.geo3k.sample_data import (
    ANSWER_FORM_PATTERNS,
    ANSWER_FORMS,
    DEFAULT_IMAGE_SIZE,
    INSTRUCTION_BLOCK,
    PROBLEM_KINDS,
    Linear,
    angle_pair_problem,
    answer_form,
    circle_problem,
    format_degrees,
    format_pi,
    format_radical,
    generate_problems,
    isosceles_triangle_problem,
    parallel_lines_problem,
    right_triangle_problem,
    round_tenth,
    similar_triangles_problem,
    triangle_angle_sum_problem,
)
from envs.images import encode_png


@pytest.fixture(scope="module")
def problems():
    # 70 = ten of each of the seven kinds; seed 0 covers every answer form.
    return generate_problems(70, seed=0)


def verify_exact(gold: str, answer: str) -> bool:
    return verify(parse_answer(gold), parse_answer(answer), timeout_seconds=None)


def numeric_value(answer: str) -> float:
    """The value a label stands for, read from its form independently of math-verify."""
    form = answer_form(answer)
    if form in ("integer", "decimal"):
        return float(answer)
    if form == "fraction":
        numerator, denominator = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", answer).groups()
        return int(numerator) / int(denominator)
    if form == "sqrt":
        coefficient, radicand = re.fullmatch(r"(\d*)\\sqrt\{(\d+)\}", answer).groups()
        return int(coefficient or 1) * math.sqrt(int(radicand))
    coefficient = answer.removesuffix("\\pi")
    if coefficient.startswith("\\frac"):
        return numeric_value(coefficient) * math.pi
    return int(coefficient or 1) * math.pi


# ---------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_problems_answers_and_png_bytes():
    first, second = generate_problems(14, seed=7), generate_problems(14, seed=7)
    assert [(p.kind, p.question, p.answer, p.signature) for p in first] == [
        (p.kind, p.question, p.answer, p.signature) for p in second
    ]
    assert [encode_png(p.image) for p in first] == [encode_png(p.image) for p in second]


def test_different_seed_gives_different_problems_and_images():
    first, second = generate_problems(14, seed=7), generate_problems(14, seed=8)
    assert [p.signature for p in first] != [p.signature for p in second]
    assert all(encode_png(a.image) != encode_png(b.image) for a, b in zip(first, second, strict=True))


def test_a_longer_list_starts_with_the_shorter_one():
    short, long = generate_problems(5, seed=3), generate_problems(12, seed=3)
    assert [p.signature for p in short] == [p.signature for p in long[:5]]


def test_seed_zero_problems_are_pinned_and_hand_checked(problems):
    # Each answer below was worked out by hand from the signature.
    assert [(p.signature, p.answer) for p in problems[:7]] == [
        ("right_triangle|leg|2|3|decimal", "2.2"),  # sqrt(3^2 - 2^2) = sqrt(5) = 2.236
        ("triangle_angle_sum|0,82|0,63|1,0|None", "35"),  # 180 - 82 - 63
        ("parallel_lines|consecutive_interior|3,63|1,25", "23"),  # (3x + 63) + (x + 25) = 180
        ("circle|arc_length|9|radius|40|exact", "2\\pi"),  # 40/360 * 2 * pi * 9
        ("similar_triangles|12,14,12|3/2|2|1|first", "21"),  # 3/2 * 14
        ("isosceles_triangle|1,0|0,67|-", "46"),  # 180 - 2 * 67
        ("angle_pair|vertical|2,52|0,106", "27"),  # 2x + 52 = 106
    ]


def test_exclude_keeps_a_split_disjoint():
    train = generate_problems(21, seed=1)
    test = generate_problems(21, seed=2, exclude=frozenset(p.signature for p in train))
    assert not {p.signature for p in train} & {p.signature for p in test}
    assert len({p.signature for p in test}) == 21


# ---------------------------------------------------------------------------------------------------------
# Text, kinds, answer forms


def test_kinds_cycle_in_order_with_balanced_counts(problems):
    assert [p.kind for p in problems[:7]] == list(PROBLEM_KINDS)
    assert Counter(p.kind for p in problems) == dict.fromkeys(PROBLEM_KINDS, 10)


def test_every_answer_form_occurs(problems):
    assert {p.answer_form for p in problems} == set(ANSWER_FORMS)


def test_problem_text_is_instruction_block_then_question_with_one_image(problems):
    for p in problems:
        assert p.problem == f"{INSTRUCTION_BLOCK}\n\n{p.question}"
        assert p.question.startswith("<image>")
        assert p.problem.count("<image>") == len(p.images) == 1


def test_instruction_block_states_the_protocol():
    assert "<think></think>" in INSTRUCTION_BLOCK
    assert (
        '<tool_call>{"name": "calc_score", "arguments": {"answer": "<digits>"}}</tool_call>'
        in INSTRUCTION_BLOCK
    )
    assert "Answer: \\boxed{$Answer}" in INSTRUCTION_BLOCK
    assert "<image>" not in INSTRUCTION_BLOCK


def test_answers_match_their_form_and_math_verify_reads_their_value(problems):
    for p in problems:
        assert ANSWER_FORM_PATTERNS[p.answer_form].fullmatch(p.answer), p.answer
        assert answer_form(p.answer) == p.answer_form
        assert verify_exact(p.answer, p.answer), p.answer
        expression = parse_answer(p.answer)[0]
        assert float(expression) == pytest.approx(numeric_value(p.answer), rel=1e-12), p.answer


def test_radicals_are_simplest_and_fractions_reduced(problems):
    for p in problems:
        if p.answer_form == "sqrt":
            radicand = int(re.search(r"\\sqrt\{(\d+)\}", p.answer).group(1))
            assert all(radicand % (k * k) for k in range(2, math.isqrt(radicand) + 1)), p.answer
        if p.answer_form == "fraction":
            numerator, denominator = map(int, re.findall(r"\d+", p.answer))
            assert math.gcd(numerator, denominator) == 1, p.answer


def test_questions_say_how_to_write_the_answer(problems):
    for p in problems:
        if p.answer_form == "sqrt":
            assert p.question.endswith("Write your answer in simplest radical form.")
        if p.answer_form == "pi":
            assert p.question.endswith("Express your answer in terms of \\pi.")
        if p.kind in ("right_triangle", "circle") and p.answer_form == "decimal":
            assert "Round to the nearest tenth" in p.question


@pytest.mark.parametrize(
    ("gold", "equivalent"),
    [
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("\\frac{15}{2}", "7.5"),
        ("16\\pi", "16 \\cdot \\pi"),
        ("54.5", "\\frac{109}{2}"),
    ],
)
def test_labels_verify_against_equivalent_forms(gold, equivalent):
    assert verify_exact(gold, equivalent)


@pytest.mark.parametrize(("gold", "wrong"), [("2\\sqrt{3}", "3.5"), ("16\\pi", "16"), ("\\frac{15}{2}", "7")])
def test_labels_do_not_verify_against_different_values(gold, wrong):
    assert not verify_exact(gold, wrong)


def test_bare_math_verify_parse_truncates_labels_which_is_why_parse_answer_wraps_them():
    assert parse("2\\sqrt{3}", parsing_timeout=None)[0] == 2
    assert float(parse_answer("2\\sqrt{3}")[0]) == pytest.approx(2 * math.sqrt(3))


# ---------------------------------------------------------------------------------------------------------
# Hand-computed answers from explicit parameters


def rng() -> random.Random:
    return random.Random(0)


@pytest.mark.parametrize(
    ("leg", "other", "unknown", "radical", "answer"),
    [
        (3, 4, "hypotenuse", False, "5"),
        (5, 13, "leg", False, "12"),
        (2, 4, "hypotenuse", True, "2\\sqrt{5}"),  # sqrt(20)
        (4, 8, "leg", True, "4\\sqrt{3}"),  # sqrt(64 - 16) = sqrt(48)
        (2, 3, "hypotenuse", False, "3.6"),  # sqrt(13) = 3.606
        (7, 9, "leg", False, "5.7"),  # sqrt(81 - 49) = sqrt(32) = 5.657
        (5, 6, "hypotenuse", True, "\\sqrt{61}"),
    ],
)
def test_right_triangle_answers(leg, other, unknown, radical, answer):
    problem = right_triangle_problem(leg, other, unknown=unknown, radical=radical, rng=rng())
    assert problem.answer == answer
    assert problem.kind == "right_triangle"


def test_triangle_angle_sum_answers():
    numbers = (Linear.number(50), Linear.number(60), Linear(1, 0))
    assert triangle_angle_sum_problem(numbers, rng=rng()).answer == "70"
    expressions = (Linear(2, 10), Linear(3, -5), Linear.number(75))  # 5x + 80 = 180
    assert triangle_angle_sum_problem(expressions, rng=rng()).answer == "20"
    asked = triangle_angle_sum_problem(expressions, find_vertex=0, rng=rng())
    assert asked.answer == "50"
    assert re.fullmatch(r"<image>Find m\\angle [A-Z]\.", asked.question)


@pytest.mark.parametrize(
    ("relation", "at_p", "at_q", "answer"),
    [
        ("corresponding", Linear.number(65), Linear(1, 5), "60"),
        ("alternate_interior", Linear(3, 19), Linear(5, -21), "20"),
        ("alternate_exterior", Linear(2, 0), Linear.number(130), "65"),
        ("consecutive_interior", Linear(3, 63), Linear(1, 25), "23"),
    ],
)
def test_parallel_lines_answers(relation, at_p, at_q, answer):
    problem = parallel_lines_problem(relation, at_p, at_q, rng=rng())
    assert problem.answer == answer
    assert problem.question == "<image>In the figure, p \\parallel q. Find x."


@pytest.mark.parametrize(
    ("measure", "radius", "given", "exact", "angle", "answer"),
    [
        ("circumference", 8, "radius", True, None, "16\\pi"),
        ("circumference", 8, "diameter", False, None, "50.3"),  # 16 pi = 50.27
        ("area", 5, "diameter", True, None, "25\\pi"),
        ("area", 3, "radius", False, None, "28.3"),  # 9 pi = 28.27
        ("arc_length", 9, "radius", True, 40, "2\\pi"),
        ("arc_length", 4, "radius", True, 45, "\\pi"),
        ("arc_length", 5, "radius", True, 30, "\\frac{5}{6}\\pi"),
        ("arc_length", 5, "radius", False, 72, "6.3"),  # 2 pi = 6.28
    ],
)
def test_circle_answers(measure, radius, given, exact, angle, answer):
    problem = circle_problem(measure, radius, given=given, exact=exact, central_angle=angle, rng=rng())
    assert problem.answer == answer


def test_similar_triangle_answers():
    fraction = similar_triangles_problem(
        (4, 6, 5), Fraction(5, 4), known=0, unknown=1, scaled="second", rng=rng()
    )
    assert fraction.answer == "\\frac{15}{2}"  # 6 * 5/4
    assert fraction.answer_form == "fraction"
    assert re.fullmatch(r"<image>\\triangle [A-Z]{3} \\sim \\triangle [A-Z]{3}\. Find x\.", fraction.question)
    whole = similar_triangles_problem(
        (6, 8, 10), Fraction(3, 2), known=0, unknown=2, scaled="first", rng=rng()
    )
    assert whole.answer == "15"


def test_isosceles_answers():
    assert isosceles_triangle_problem(Linear.number(40), Linear(1, 0), rng=rng()).answer == "70"
    assert isosceles_triangle_problem(Linear.number(71), None, Linear(1, 0), rng=rng()).answer == "54.5"
    assert isosceles_triangle_problem(Linear(1, 0), Linear.number(38), rng=rng()).answer == "104"
    # Equal base angles: 2x + 4 = 3x - 20.
    assert isosceles_triangle_problem(None, Linear(2, 4), Linear(3, -20), rng=rng()).answer == "24"


def test_angle_pair_answers():
    assert angle_pair_problem("vertical", Linear(2, 52), Linear.number(106), rng=rng()).answer == "27"
    assert angle_pair_problem("linear_pair", Linear(3, -26), Linear.number(128), rng=rng()).answer == "26"
    assert angle_pair_problem("linear_pair", Linear(5, 10), Linear(3, 10), rng=rng()).answer == "20"


def test_builders_reject_impossible_figures():
    with pytest.raises(ValueError, match=r"the hypotenuse \(3\) must be longer than the leg \(5\)"):
        right_triangle_problem(5, 3, unknown="leg", radical=False, rng=rng())
    with pytest.raises(ValueError, match=r"the angle labelled x° comes out as -10 degrees"):
        triangle_angle_sum_problem((Linear.number(150), Linear.number(40), Linear(1, 0)), rng=rng())
    with pytest.raises(ValueError, match=r"do not determine x \(equal x-coefficients\)"):
        angle_pair_problem("vertical", Linear(2, 10), Linear(2, 30), rng=rng())
    with pytest.raises(ValueError, match=r"sides \(1, 2, 5\) do not form a triangle"):
        similar_triangles_problem((1, 2, 5), Fraction(2), known=0, unknown=1, scaled="second", rng=rng())
    with pytest.raises(ValueError, match=r"relation must be one of corresponding, "):
        parallel_lines_problem("vertical", Linear(1, 0), Linear.number(50), rng=rng())


def test_unknown_kind_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"unknown problem kind 'circel'.*Did you mean 'circle'\?"):
        generate_problems(1, seed=0, kinds=["circel"])


# ---------------------------------------------------------------------------------------------------------
# Formatting helpers


def test_formatting_helpers():
    assert [format_radical(n) for n in (12, 25, 41, 72, 2)] == [
        "2\\sqrt{3}",
        "5",
        "\\sqrt{41}",
        "6\\sqrt{2}",
        "\\sqrt{2}",
    ]
    assert [round_tenth(v) for v in (math.sqrt(13), 10.04, math.pi * 9)] == ["3.6", "10", "28.3"]
    assert [format_degrees(v) for v in (Fraction(109, 2), Fraction(70), Fraction(1, 3))] == [
        "54.5",
        "70",
        "\\frac{1}{3}",
    ]
    assert [format_pi(v) for v in (Fraction(1), Fraction(16), Fraction(9, 2))] == [
        "\\pi",
        "16\\pi",
        "\\frac{9}{2}\\pi",
    ]
    assert [Linear(3, -5).label(), Linear(1, 0).label(), Linear(0, 70).label(), Linear(2, 0).label()] == [
        "(3x - 5)°",
        "x°",
        "70°",
        "2x°",
    ]
    with pytest.raises(ValueError, match="too close to a rounding tie"):
        round_tenth(12.25)
    with pytest.raises(ValueError, match=r"answer '3,5' is in none of the forms"):
        answer_form("3,5")


# ---------------------------------------------------------------------------------------------------------
# Diagrams


def test_images_are_white_rgb_diagrams_of_the_configured_size(problems):
    for p in problems[:14]:
        assert p.image.mode == "RGB"
        assert p.image.size == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        assert p.image.getpixel((0, 0)) == (255, 255, 255)
        darkest = min(p.image.convert("L").getextrema())
        assert darkest < 60, f"{p.kind} diagram has no dark strokes"


def test_image_size_is_configurable():
    for p in generate_problems(7, seed=0, image_size=320):
        assert p.image.size == (320, 320)
    with pytest.raises(ValueError, match="image_size must be at least 160 pixels"):
        generate_problems(1, seed=0, image_size=100)
