"""easy-VQA single-input ceilings: attributes read off the questions, the majority rule."""

from __future__ import annotations

import pytest

from evals.tasks.easy_vqa.ceiling import ceilings, image_attributes, majority_accuracy


def test_attributes_come_from_answers_and_affirmed_yes_no_questions() -> None:
    questions = [
        "what color is the shape?",
        "is there a circle?",
        "does the image not contain a red shape?",
        "is there a blue shape?",
        "is there a triangle in the image?",
        "does the image not contain a rectangle?",
    ]
    answers = ["green", "yes", "no", "no", "no", "yes"]
    images = [0, 0, 1, 1, 2, 2]
    assert image_attributes(questions, answers, images) == {
        0: ("circle", "green"),
        1: (None, "red"),  # "no" to a "not red" question: red; "no" to blue says nothing
        2: (None, None),  # denials only
    }


def test_majority_rule_answers_each_keys_most_frequent_answer() -> None:
    fit_keys, fit_answers = ["a", "a", "a", "b"], ["yes", "yes", "no", "red"]
    # "a" -> yes, "b" -> red, unseen "c" -> the overall majority (yes).
    accuracy = majority_accuracy(
        fit_keys, fit_answers, ["a", "b", "c", "a"], ["yes", "no", "yes", "no"]
    )
    assert accuracy == 0.5


@pytest.mark.slow
def test_easy_vqa_ceilings_on_the_real_data() -> None:
    pytest.importorskip("easy_vqa")
    figures = ceilings()
    for row in figures.values():
        assert 0.0 < row["from_train"] <= row["in_sample"] < 1.0
    # The question alone fixes the answer type; the image alone leaves yes/no to chance.
    assert figures["text_only"]["from_train"] > 0.6 > 0.4 > figures["image_only"]["from_train"]
