"""Image pad runs: expansion to the processor's count, compression back to one pad per image."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.processing import ImagePadMismatch

TEXT = st.lists(st.integers(100, 120), max_size=6)


def reference_expand(processing, ids: list[int], pad_counts: list[int]) -> list[int]:
    """Token by token: every run of pads right after <|vision_start|> becomes its image's count."""
    out, image, i = [], 0, 0
    while i < len(ids):
        out.append(ids[i])
        i += 1
        if out[-1] != processing.vision_start_id or i >= len(ids) or ids[i] != processing.image_pad_id:
            continue
        run = 0
        while i < len(ids) and ids[i] == processing.image_pad_id:
            run, i = run + 1, i + 1
        if image >= len(pad_counts) or run not in (1, pad_counts[image]):
            raise ImagePadMismatch("reference")
        out += [processing.image_pad_id] * pad_counts[image]
        image += 1
    if image != len(pad_counts):
        raise ImagePadMismatch("reference")
    return out


def reference_compress(processing, ids: list[int]) -> list[int]:
    pad = processing.image_pad_id
    return [t for i, t in enumerate(ids) if not (t == pad and i and ids[i - 1] == pad)]


@st.composite
def prompts(draw):
    """Text with images in it, each rendered as a single pad, an expanded run or a wrong run."""
    return draw(st.lists(st.tuples(TEXT, st.integers(1, 300), st.sampled_from(["single", "expanded", "wrong"])),
                         max_size=4)), draw(TEXT)  # fmt: skip


def render(processing, parts, tail) -> tuple[list[int], list[int]]:
    ids, counts = [], []
    for text, count, form in parts:
        run = {"single": 1, "expanded": count, "wrong": count + 1}[form]
        ids += text + [processing.vision_start_id] + [processing.image_pad_id] * run + [processing.vision_end_id]
        counts.append(count)
    return ids + tail, counts


@settings(max_examples=200, deadline=None)
@given(prompt=prompts(), extra_image=st.booleans())
def test_expand_and_compress_agree_with_the_token_by_token_rules(qwen25_processing, prompt, extra_image):
    processing = qwen25_processing
    ids, counts = render(processing, *prompt)
    if extra_image:
        counts.append(16)
    try:
        expected = reference_expand(processing, ids, counts)
    except ImagePadMismatch:
        with pytest.raises(ImagePadMismatch):
            processing.expand_image_pads(ids, counts)
        return
    expanded = processing.expand_image_pads(ids, counts)
    assert expanded == expected
    assert processing.count_image_pads(expanded) == sum(counts)
    assert processing.compress_image_pads(expanded) == reference_compress(processing, expanded)
    assert processing.compress_image_pads(expanded) == processing.compress_image_pads(ids)


def test_pads_outside_an_image_are_compressed_too(qwen25_processing):
    pad = qwen25_processing.image_pad_id
    assert qwen25_processing.compress_image_pads([pad, pad, 5, pad, pad, pad]) == [pad, 5, pad]
    assert qwen25_processing.compress_image_pads([]) == []
