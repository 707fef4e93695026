"""The judged behaviour on real data: a checkpoint trained on easy-VQA with the offline default
answers a real test question about its real image, then the same question with no image, and
says the image was missing (through the Python API and `mllm-missing chat`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "recipes/configs/easy_vqa/offline-default_zero.yaml"
QUESTION = "What shape is in the image?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """zero-fill + concat trained on 8,000 easy-VQA questions for 4 epochs (about a minute on
    2 CPU cores, most of it encoding the images once)."""
    pytest.importorskip("easy_vqa")
    from mllm_missing.cli import main

    out = tmp_path_factory.mktemp("chat_easy_vqa") / "zero"
    args = ["train", str(RECIPE), "limit_train=8000", "limit_val=300", "limit_test=300",
            "batch_size=128", "epochs=4", "train_missing=both:0.5", "threads=1",
            f"output_dir={out}"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def example() -> tuple[str, str, str]:
    """A real test question "what shape is in the image?", its image and its answer."""
    easy_vqa = pytest.importorskip("easy_vqa")
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    for text, answer, image_id in zip(texts, answers, image_ids):
        if text == QUESTION.lower():
            return text, paths[image_id], answer
    raise AssertionError("no shape question in the easy-VQA test split")


@pytest.mark.slow
def test_answers_with_the_image_then_says_it_is_missing(
    checkpoint: Path, example: tuple[str, str, str]
) -> None:
    import torch

    from mllm_missing.chat import ChatSession, ClassifierAnswerer
    from mllm_missing.inference.predict import load_checkpoint

    torch.set_num_threads(1)
    _, image, truth = example
    session = ChatSession(ClassifierAnswerer(load_checkpoint(checkpoint, device="cpu")))
    pieces: list[str] = []
    seen = session.ask(QUESTION, image=image, stream=pieces.append)
    assert seen.ok and seen.answer.startswith(f"{truth} (")  # circle, from the image
    assert seen.used == ["image", "text"] and seen.missing == []
    assert "".join(pieces) == seen.render()
    blind = session.ask(QUESTION)
    assert blind.ok and blind.used == ["text"] and blind.missing == ["image"]
    assert "missing: image" in blind.render()
    assert "the image was missing: zero imputation stood in" in blind.render()
    # without the image the model can only guess a shape from the question's prior
    assert blind.answer.split(" (")[0] in ("circle", "rectangle", "triangle")

    def confidence(turn: Any) -> float:
        return float(turn.answer.split("(")[1].split(" %")[0])

    assert confidence(blind) < confidence(seen)


@pytest.mark.slow
def test_terminal_session_with_and_without_the_image(
    checkpoint: Path, example: tuple[str, str, str], tmp_path: Path
) -> None:
    _, image, truth = example
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    script = f"/image {image}\n{QUESTION}\n{QUESTION}\n/image {notes}\n{QUESTION}\n"
    run = subprocess.run(
        [sys.executable, "-m", "mllm_missing.cli", "chat", "--checkpoint", str(checkpoint),
         "--threads", "1"],
        input=script, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    out = run.stdout
    assert f"you> {truth} (" in out
    assert "used: image, text; missing: \u2014; modules: zero+concat (scheduler: fixed)" in out
    assert "used: text; missing: image; modules: zero+concat (scheduler: fixed)" in out
    assert f"error: image {notes}: not an image (no image format Pillow reads)" in out
    assert out.count("used: text; missing: image") == 1  # the bad image's turn was refused
