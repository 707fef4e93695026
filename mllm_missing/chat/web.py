"""The web chat (`mllm-missing chat --web`): a page on localhost to upload an image and/or audio,
type a question, and see the answer with the used / missing modalities and the scheduler's choice.

Standard library only: `http.server` serves the page (`mllm_missing.chat.page`) at ``/`` and
answers ``POST /ask`` (``multipart/form-data`` with optional ``text``, ``image`` and ``audio``
fields) with the `ChatTurn` as JSON. ``POST /ask?stream=1`` answers the same form as
newline-delimited JSON instead: ``{"piece": ...}`` for each piece of the answer as it is
generated (a VLM's tokens), then ``{"turn": ...}``, the finished turn; the page uses it to show
the answer as it is produced. A request body over the session's file limit plus 1 MB is
refused before it is read, with HTTP 413 and a message the page shows (the rest of the body is
then drained and dropped, so the client gets the answer, not a reset). The server binds to
127.0.0.1 unless another host is given; turns run one at a time (the model is not thread-safe).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mllm_missing.chat.page import PAGE
from mllm_missing.chat.session import ChatSession

__all__ = ["make_server", "parse_multipart", "serve"]

logger = logging.getLogger(__name__)

_FORM_SLACK = 1024 * 1024  # room for the text field and multipart headers
_DRAIN_BYTES = 16 * 1024 * 1024  # what a refused upload may still send while its answer is read


def parse_multipart(content_type: str, body: bytes) -> dict[str, bytes | str]:
    """The fields of a ``multipart/form-data`` body: files as bytes, others as str; empty file
    inputs are left out.

    Raises:
        ValueError: the body is not multipart form data.
    """
    if not content_type.startswith("multipart/form-data"):
        raise ValueError(f"expected multipart/form-data, got {content_type or 'no content type'}")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("the form body is not multipart")
    fields: dict[str, bytes | str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        data = part.get_payload(decode=True)
        data = data if isinstance(data, bytes) else b""
        if part.get_filename() is not None:
            if data:
                fields[name] = data
        else:
            fields[name] = data.decode(part.get_content_charset() or "utf-8", "replace")
    return fields


class _Handler(BaseHTTPRequestHandler):
    server: _ChatServer
    _gone = False  # the client closed a streamed answer's connection

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _discard_body(self, length: int) -> None:
        """Let a refused upload finish sending (read in small chunks and dropped, at most
        `_DRAIN_BYTES`, 2 s): closing with its bytes unread would reset the connection, and the
        client would see a broken pipe instead of the answer just sent."""
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(2.0)
            left = min(length, _DRAIN_BYTES)
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # the client went away: nothing left to tell it

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            limit_mb = self.server.session.limits.max_file_bytes / (1024 * 1024)
            page = PAGE.replace("__LIMIT_MB__", f"{limit_mb:g}")
            self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        if path != "/ask":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
            return
        limit = self.server.session.limits.max_file_bytes
        length = int(self.headers.get("Content-Length") or 0)
        if length > 2 * limit + _FORM_SLACK:
            # Not read: say why and close, so a huge upload costs nothing.
            self.close_connection = True
            self._json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"the upload is too large ({length / 2**20:.1f} MB; each file may be "
                 f"at most {limit / 2**20:g} MB)"},
            )  # fmt: skip
            self._discard_body(length)
            return
        try:
            fields = parse_multipart(self.headers.get("Content-Type", ""), self.rfile.read(length))
        except ValueError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        text = fields.get("text")
        inputs: dict[str, Any] = {
            "text": text if isinstance(text, str) and text.strip() else None,
            "image": fields.get("image") or None,
            "audio": fields.get("audio") or None,
        }
        if "stream=1" not in query.split("&"):
            with self.server.lock:
                turn = self.server.session.ask(**inputs)
            self._json(HTTPStatus.OK, turn.to_dict())
            return
        self.close_connection = True  # no length known: the body ends with the connection
        self._gone = False
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        held: list[str] = []

        def forward(piece: str) -> None:
            # The session's last piece is the status lines (or the error): hold each piece
            # back until the next arrives, so only the answer's pieces go out as pieces.
            if held:
                self._line({"piece": held.pop()})
            held.append(piece)

        with self.server.lock:
            turn = self.server.session.ask(**inputs, stream=forward)
        self._line({"turn": turn.to_dict()})

    def _line(self, payload: dict[str, Any]) -> None:
        if self._gone:
            return
        try:
            self.wfile.write(json.dumps(payload).encode() + b"\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The page went away mid-answer: the turn still finishes (and is in the history).
            self._gone = True


class _ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], session: ChatSession) -> None:
        self.session = session
        self.lock = threading.Lock()
        super().__init__(address, _Handler)


def make_server(session: ChatSession, host: str = "127.0.0.1", port: int = 0) -> _ChatServer:
    """A server for `session` bound to ``host:port`` (port 0: a free one; read
    ``server.server_address``). Call ``serve_forever()`` on it, ``shutdown()`` to stop."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving the chat on %s: anyone who can reach it can use the model", host)
    return _ChatServer((host, port), session)


def serve(session: ChatSession, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the chat page until interrupted (Ctrl-C)."""
    server = make_server(session, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"mllm-missing chat: open http://{bound_host!s}:{bound_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
