"""The terminal chat (`mllm-missing chat`): type a question, attach an image or audio with a
command, read the streamed answer and what was used, missing and chosen.

Commands: ``/image PATH`` and ``/audio PATH`` attach a file to the next question (a turn may be
only an attachment: press Enter on an empty line to send it), ``/clear`` drops pending
attachments and the history, ``/help`` lists the commands, ``/quit`` (or end of input) ends the
session. A bad input prints ``error: ...`` naming the problem and the session goes on.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TextIO

from mllm_missing.chat.session import ChatSession

__all__ = ["HELP", "run_repl"]

HELP = """\
Type a question and press Enter. Attach inputs to the next question with:
  /image PATH   an image (PNG, JPEG, ...)
  /audio PATH   speech (WAV, FLAC, ...); Whisper turns it into text
  /clear        drop pending attachments and the history
  /help         this text
  /quit         end the session (so does Ctrl-D)
An empty line sends the pending attachments without text."""


def _path_argument(rest: str) -> str:
    """The path after a command: shell-style quoting allowed, else the rest of the line."""
    try:
        parts = shlex.split(rest)
    except ValueError:
        parts = []
    return parts[0] if len(parts) == 1 else rest.strip()


def run_repl(
    session: ChatSession,
    stdin: TextIO,
    stdout: TextIO,
    *,
    prompt: str = "you> ",
    banner: str | None = None,
) -> int:
    """Run the chat until ``/quit`` or end of input; returns the number of answered turns.

    Args:
        session: the chat session.
        stdin: where lines are read from.
        stdout: where prompts, answers (streamed, flushed per piece) and messages go.
        prompt: printed before each question.
        banner: printed once at the start (default: a one-line hint).
    """

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write((banner if banner is not None else "mllm-missing chat; /help for commands") + "\n")
    pending: dict[str, str] = {}
    answered = 0
    while True:
        write(prompt)
        line = stdin.readline()
        if not line:  # end of input
            write("\n")
            break
        line = line.strip()
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/help":
            write(HELP + "\n")
            continue
        if command == "/clear":
            pending.clear()
            session.clear()
            write("cleared\n")
            continue
        if command in ("/image", "/audio"):
            kind = command[1:]
            path = _path_argument(rest)
            if not path:
                write(f"error: give a file: {command} PATH\n")
            elif not Path(path).expanduser().exists():
                write(f"error: {kind} file not found: {path}\n")
            else:
                pending[kind] = path
                write(f"attached {kind} {path} (sent with the next question)\n")
            continue
        if command.startswith("/"):
            write(f"error: unknown command {command}; /help lists them\n")
            continue
        turn = session.ask(
            text=line or None, image=pending.get("image"), audio=pending.get("audio"), stream=write
        )
        pending.clear()
        answered += int(turn.ok)
    return answered
