"""The terminal chat: commands, attachments for the next question only, streamed replies, bad
input as a message, end of input; and `mllm-missing chat` wiring."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from mllm_missing.chat.terminal import HELP, run_repl


def drive(session: Any, *lines: str) -> tuple[str, int]:
    stdout = io.StringIO()
    answered = run_repl(session, io.StringIO("".join(f"{x}\n" for x in lines)), stdout)
    return stdout.getvalue(), answered


def test_attach_ask_and_ask_again_without_the_image(session: Any, files: dict[str, Path]) -> None:
    out, answered = drive(
        session, f"/image {files['png']}", "what shape is it", "what shape is it", "/quit",
        "never read",
    )  # fmt: skip
    assert answered == 2
    assert f"attached image {files['png']} (sent with the next question)" in out
    assert "used: image, text; missing: \u2014; modules: zero+concat (scheduler: fixed)" in out
    assert "used: text; missing: image; modules: zero+concat (scheduler: fixed)" in out
    assert "note: the image was missing: zero imputation stood in" in out
    assert [t.used for t in session.history] == [["image", "text"], ["text"]]


def test_audio_and_empty_line_sends_attachments(session: Any, files: dict[str, Path]) -> None:
    out, answered = drive(session, f"/audio '{files['wav']}'", "")
    assert answered == 1 and 'heard: "what shape is in the image"' in out
    assert out.endswith("you> \n")  # end of input ends the session


def test_bad_inputs_print_errors_and_the_session_goes_on(
    session: Any, files: dict[str, Path]
) -> None:
    out, answered = drive(
        session,
        "",  # empty turn
        f"/image {files['txt']}", "what shape",  # not an image
        f"/audio {files['png']}", "what shape",  # not audio
        f"/image {files['png'].parent}/missing.png",  # missing path, refused at once
        "/image", "/bogus", "/help",
        "what shape",
    )  # fmt: skip
    assert "error: nothing to answer: type a question, or attach an image or audio" in out
    assert f"error: image {files['txt']}: not an image" in out
    assert f"error: audio {files['png']}: not a readable audio file" in out
    assert f"error: image file not found: {files['png'].parent}/missing.png" in out
    assert "error: give a file: /image PATH" in out
    assert "error: unknown command /bogus" in out
    assert HELP in out
    assert answered == 1 and out.count("used: text; missing: image") == 1


def test_huge_file_in_the_terminal(tiny_model: Any, files: dict[str, Path]) -> None:
    from mllm_missing.chat import ChatLimits, ChatSession, ClassifierAnswerer

    session = ChatSession(ClassifierAnswerer(tiny_model), limits=ChatLimits(max_file_bytes=100))
    out, answered = drive(session, f"/image {files['png']}", "what", "what")
    assert f"error: image {files['png']} is too large (" in out and answered == 1


def test_clear_drops_pending_attachments(session: Any, files: dict[str, Path]) -> None:
    out, _ = drive(session, f"/image {files['png']}", "/clear", "what shape")
    assert "cleared" in out and session.history[-1].used == ["text"]


def test_chat_subcommand_parses_and_imports_lazily() -> None:
    import subprocess
    import sys

    from mllm_missing.cli import build_parser

    args = build_parser().parse_args(["chat", "--checkpoint", "ck", "--web", "--port", "0"])
    assert args.web and args.host == "127.0.0.1" and args.device == "cpu"
    code = "import mllm_missing.cli as c, sys; c.build_parser(); sys.exit('mllm_missing.chat' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_chat_without_a_checkpoint_is_an_error(tmp_path: Path, capsys: Any) -> None:
    from mllm_missing.cli import main

    assert main(["chat", "--checkpoint", str(tmp_path)]) == 2
    assert "no model_config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_real_whisper_transcribes_speech_in_a_turn(tiny_model: Any) -> None:
    speech = Path("/usr/share/pocketsphinx/test/data/librivox")
    if not speech.is_dir():
        pytest.skip("Debian pocketsphinx-testdata is not installed (scripts/install.sh dev)")
    from mllm_missing.chat import ChatSession, ClassifierAnswerer

    session = ChatSession(ClassifierAnswerer(tiny_model))  # default: Whisper tiny.en
    wav = sorted(speech.glob("*.wav"))[0]
    turn = session.ask(audio=wav)
    assert turn.ok and turn.used == ["audio"] and turn.missing == ["image"]
    assert turn.transcript and len(turn.transcript.split()) >= 3
    assert turn.question == turn.transcript
