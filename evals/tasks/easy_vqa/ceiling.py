"""How well any model can do on easy-VQA with one input: the per-pattern ceilings.

With the question alone the best answer is the one most often given to that question; with the
image alone it is the one most often given about images of that shape and colour (which question
was asked is unknown). These rules are estimated on the training split and scored on test, so they
are what a perfect single-modality model learns; the in-sample rule (estimated on test itself) is
an optimistic bound above it. An imputation or a retrieval that fills the absent input can only
move a single-modality row up to these ceilings, whatever it puts in::

    python -m evals.tasks.easy_vqa.ceiling [--json PATH]

The image's shape and colour are read off its questions (an answer that names them, or a yes/no
question about them); images whose questions reveal neither are grouped as unknown.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path

__all__ = ["COLOURS", "SHAPES", "image_attributes", "main", "majority_accuracy"]

COLOURS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
SHAPES = frozenset({"circle", "rectangle", "triangle"})


def image_attributes(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, tuple[str | None, str | None]]:
    """Per image, (shape, colour) as its questions reveal them (None where none does).

    An answer that is a shape or colour names it; a yes/no question names the attributes it
    mentions when its answer says they are there ("yes", or "no" to a "not" question).
    """
    found: dict[int, dict[str, str]] = defaultdict(dict)
    for question, answer, image in zip(questions, answers, image_ids, strict=True):
        seen = found[image]
        if answer in SHAPES:
            seen["shape"] = answer
        elif answer in COLOURS:
            seen["colour"] = answer
        elif answer in ("yes", "no"):
            words = set(question.lower().rstrip("?").split())
            if (answer == "yes") != ("not" in words):
                for word in words & SHAPES:
                    seen["shape"] = word
                for word in words & COLOURS:
                    seen["colour"] = word
    return {image: (seen.get("shape"), seen.get("colour")) for image, seen in found.items()}


def majority_accuracy(
    fit_keys: Sequence[Hashable],
    fit_answers: Sequence[str],
    keys: Sequence[Hashable],
    answers: Sequence[str],
) -> float:
    """Accuracy on (`keys`, `answers`) of answering each key's most frequent answer in the fit
    data (the overall most frequent one for a key never seen there)."""
    counts: dict[Hashable, Counter[str]] = defaultdict(Counter)
    for key, answer in zip(fit_keys, fit_answers, strict=True):
        counts[key][answer] += 1
    fallback = Counter(fit_answers).most_common(1)[0][0]
    best = {key: c.most_common(1)[0][0] for key, c in counts.items()}
    hits = sum(best.get(key, fallback) == answer for key, answer in zip(keys, answers, strict=True))
    return hits / len(answers)


def ceilings() -> dict[str, dict[str, float]]:
    """Text-only and image-only ceilings (accuracy, 0-1) on the test split, each as the rule
    estimated on train and the in-sample rule estimated on test."""
    import easy_vqa

    train_q, train_a, train_i = easy_vqa.get_train_questions()
    test_q, test_a, test_i = easy_vqa.get_test_questions()
    train_attr = image_attributes(train_q, train_a, train_i)
    test_attr = image_attributes(test_q, test_a, test_i)
    train_keys = [train_attr[i] for i in train_i]
    test_keys = [test_attr[i] for i in test_i]
    return {
        "text_only": {
            "from_train": majority_accuracy(train_q, train_a, test_q, test_a),
            "in_sample": majority_accuracy(test_q, test_a, test_q, test_a),
        },
        "image_only": {
            "from_train": majority_accuracy(train_keys, train_a, test_keys, test_a),
            "in_sample": majority_accuracy(test_keys, test_a, test_keys, test_a),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the ceilings (and write them as JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m evals.tasks.easy_vqa.ceiling")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = ceilings()
    print("easy-VQA test accuracy (%) a perfect single-input model reaches")
    print(f"{'input':<14}{'rule from train':>18}{'in-sample bound':>18}")
    for name, label in (("text_only", "question only"), ("image_only", "image only")):
        row = figures[name]
        print(f"{label:<14}{100 * row['from_train']:>18.2f}{100 * row['in_sample']:>18.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
