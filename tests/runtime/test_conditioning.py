"""Condition extraction for text-to-image (the official ``tokenize_images`` rules)."""

from __future__ import annotations

import logging

import pytest
import torch

from kelix_fast.runtime.conditioning import extract_condition, text_to_image_prompt

VS, VE, EOB = 7, 8, 9


def _groups(slot0):
    g = torch.full((len(slot0), 3), EOB)
    g[:, 0] = torch.tensor(slot0)
    return g


def test_prompt_is_cut_after_the_assistant_turn_and_opened_with_vision_start():
    ids = [1, 2, 3, 50, 51, 52, 1, 4, 5, 99]
    assert text_to_image_prompt(ids, assistant_prefix=[1, 4, 5], vision_start=VS) == [
        1,
        2,
        3,
        50,
        51,
        52,
        1,
        4,
        5,
        VS,
    ]
    assert text_to_image_prompt([1, 4, 5, VS], assistant_prefix=[1, 4, 5], vision_start=VS) == [
        1,
        4,
        5,
        VS,
    ]
    assert text_to_image_prompt([3, 4], assistant_prefix=None, vision_start=VS) == [3, 4, VS]
    with pytest.raises(ValueError, match="must not be empty"):
        text_to_image_prompt([], assistant_prefix=None, vision_start=VS)
    with pytest.raises(ValueError, match="assistant turn prefix"):
        text_to_image_prompt([1, 2, 3], assistant_prefix=[1, 4, 5], vision_start=VS)


def test_matched_span_includes_both_markers_and_pads():
    groups = _groups([1, VS, 20, 21, VE, 2, 3])
    hidden = torch.arange(6.0)[:, None].expand(6, 2)
    c = extract_condition(groups, hidden, vision_start=VS, vision_end=VE, max_length=6)
    assert c.matched and c.length == 4
    assert c.hidden[0, :, 0].tolist() == [1, 2, 3, 4, 0, 0]
    assert c.mask.tolist() == [[1, 1, 1, 1, 0, 0]]


def test_markers_in_any_slot_count_and_long_spans_are_cut():
    groups = _groups([VS, 20, 21, 22, 23, 2])
    groups[4, 1] = VE  # the official search looks at every slot
    c = extract_condition(groups, torch.randn(5, 2), vision_start=VS, vision_end=VE, max_length=3)
    assert c.matched and c.length == 3 and c.mask.tolist() == [[1, 1, 1]]


def test_unclosed_image_falls_back_with_a_warning(caplog):
    groups = _groups([1, VS, 20, 21])
    with caplog.at_level(logging.WARNING):
        c = extract_condition(
            groups, torch.randn(3, 2), vision_start=VS, vision_end=VE, max_length=5
        )
    assert not c.matched and c.length == 2  # only 2 states exist from vision_start on
    assert "official fallback" in caplog.text


def test_no_image_is_an_error():
    with pytest.raises(ValueError, match="no <\\|vision_start\\|>"):
        extract_condition(
            _groups([1, 2]), torch.randn(1, 2), vision_start=VS, vision_end=VE, max_length=4
        )
