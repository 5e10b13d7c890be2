"""A loopback HTTP server for the demo corpus and for every bad response a downloader must survive.

``serve(directory)`` serves the files under ``directory`` from a background thread and yields an
object with ``.url`` (``http://127.0.0.1:PORT``). Besides plain files it answers bad-case routes,
each followed by a file path (``/bad/404/images/x.jpg``):

- ``/bad/404/…``, ``/bad/500/…``: that status.
- ``/bad/slow/…``: sleeps ``slow_seconds`` before answering (past a client's timeout).
- ``/bad/redirect-loop/…``: a 302 to itself.
- ``/bad/empty/…``: 200 with a zero-byte body.
- ``/bad/html/…``: 200 ``text/html``, not an image.
- ``/bad/truncated/…``: the file's first half.
- ``/bad/huge/…``: a valid 12000x12000 PNG (a few hundred KB) over any sane pixel limit.
- ``/bad/bomb-rgba/…``: a valid 20000x20000 RGBA PNG (1.6 GB of pixels in about 1.6 MB).
- ``/bad/rgba-6000/…``: the same picture at 6000x6000, under the area limit: stored, and its alpha
  must be composited without img2dataset's float64 arrays (storage.image_prep).
- ``/bad/endless/…``: 200 with no Content-Length and a body that does not end (until 1 GB).
- ``/bad/dribble/…``: the file at one byte a second (each read within any timeout, the whole never).
- ``/bad/gzip-encoded/…``: the file's bytes as they are, sent with ``Content-Encoding: gzip`` (a
  small gzip file of zeros is a decompression bomb for a client that decodes it).
- ``/noai/…``: the real file with ``X-Robots-Tag: noai`` (an opt-out a downloader must honour).
- ``/tdm/…``: the real file with ``tdm-reservation: 1`` (the TDM Reservation Protocol's opt-out).
- ``/redirect/TARGET``: a 302 to ``TARGET``, a whole url percent-encoded into one path segment
  (``urllib.parse.quote(url, safe="")``): to an internal address, to ``ftp://``...
- ``/flaky/N/…``: 500 for the first N requests of that path, then the file (retry tests).
- ``/delay/MS/…``: the file after MS milliseconds (a slow-ish but working host).

``python -m storage.demo.server DIR --port N`` serves a directory by hand.
"""
from __future__ import annotations

import argparse
import errno
import functools
import mimetypes
import os
import posixpath
import struct
import threading
import time
import urllib.parse
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

from storage.errors import CCRKError

HUGE_SIDE = 12000


@functools.lru_cache(maxsize=1)
def huge_png(side: int = HUGE_SIDE) -> bytes:
    """A valid 1-bit grayscale PNG of side x side pixels; all white, so it compresses to a small file."""
    row = b"\x00" + b"\xff" * ((side + 7) // 8)  # filter byte 0 + packed bits
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row) for _ in range(side)]
    idat = b"".join(chunks) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BOMB_SIDE = 20000


@functools.lru_cache(maxsize=2)
def bomb_png(side: int = BOMB_SIDE, rows_per_block: int = 100) -> bytes:
    """A valid RGBA PNG of side x side pixels of one half-transparent colour. Its zlib stream is one
    block of ``rows_per_block`` rows compressed once and repeated (identical after a full flush), so
    it is made in a second rather than by compressing all the pixels."""
    block = (b"\x00" + b"\x80\x40\x20\x80" * side) * rows_per_block
    comp = zlib.compressobj(9)
    first = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)  # zlib header + the block
    again = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)  # the block alone
    blocks, rest = divmod(side, rows_per_block)
    if rest:
        raise ValueError(f"side {side} is not a multiple of {rows_per_block}")
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    final = comp.flush()[:-4] + struct.pack(">I", adler)  # the last (empty) block, the whole stream's adler32
    idat = first + again * (blocks - 1) + final
    return _png(struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0), idat)


def _png(ihdr: bytes, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@dataclass
class LoopbackServer:
    """A running server: ``url`` is its base url; ``hits`` counts requests per path."""

    url: str
    directory: str
    httpd: ThreadingHTTPServer
    hits: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``HOST:PORT``: the exact pair an acquisition from this server allows (storage.addresses)."""
        return self.url.split("://", 1)[1]

    def hit_count(self, path: str) -> int:
        return self.hits.get(path, 0)


class _Handler(BaseHTTPRequestHandler):
    """The files under ``root`` and the bad-case routes (see the module docstring); ``state`` counts
    requests per path (under ``lock``). :func:`_make_handler` binds them to one server."""

    protocol_version = "HTTP/1.0"
    root: str = ""
    slow_seconds: float = 5.0
    state: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests and benchmarks run thousands
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream",
              headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts): nothing to tell it

    def _stream(self, chunks, ctype: str, length: int | None = None, limit: int | None = None,
                pause: float = 0.0) -> None:
        """200 with ``chunks`` written one by one (``pause`` seconds before each) until ``limit`` bytes
        or the client leaves; Content-Length ``length`` if given (none: the body ends at the close)."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            sent = 0
            for chunk in chunks:
                if limit is not None and sent >= limit:
                    break
                time.sleep(pause)
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what the route is for

    def _file(self, rel: str) -> tuple[bytes, str] | None:
        rel = posixpath.normpath(urllib.parse.unquote(rel)).lstrip("/")
        path = os.path.realpath(os.path.join(self.root, rel))
        if not (path == self.root or path.startswith(self.root + os.sep)) or not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            data = f.read()
        return data, mimetypes.guess_type(path)[0] or "application/octet-stream"

    def _serve_file(self, rel: str, headers: dict | None = None, transform=None) -> None:
        found = self._file(rel)
        if found is None:
            self._send(404, b"not found", "text/plain")
            return
        data, ctype = found
        if transform is not None:
            data = transform(data)
        self._send(200, data, ctype, headers)

    def _count(self, path: str) -> int:
        """This request's number among the requests of ``path`` (1 for the first)."""
        with self.lock:
            self.state[path] = self.state.get(path, 0) + 1
            return self.state[path]

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_GET(self):  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        count = self._count(path)
        parts = path.lstrip("/").split("/", 2)
        head = parts[0]
        if head == "bad" and len(parts) >= 2:
            self._bad(parts[1], parts[2] if len(parts) > 2 else "", path)
        elif head == "noai" and len(parts) >= 2:
            self._serve_file(path[len("/noai/"):], {"X-Robots-Tag": "noai"})
        elif head == "tdm" and len(parts) >= 2:
            self._serve_file(path[len("/tdm/"):], {"tdm-reservation": "1"})
        elif head == "redirect" and len(parts) == 2:
            self._send(302, b"", "text/plain", {"Location": urllib.parse.unquote(parts[1])})
        elif head == "flaky" and len(parts) == 3 and parts[1].isdigit():
            if count <= int(parts[1]):
                self._send(500, b"flaky: try again", "text/plain")
            else:
                self._serve_file(parts[2])
        elif head == "delay" and len(parts) == 3 and parts[1].isdigit():
            time.sleep(int(parts[1]) / 1000)
            self._serve_file(parts[2])
        else:
            self._serve_file(path)

    def _bad(self, kind: str, rest: str, path: str) -> None:
        """``/bad/<kind>/<rest>``: the bad response ``kind`` names (of the file ``rest``, for some)."""
        if kind == "404":
            self._send(404, b"not found", "text/plain")
        elif kind == "500":
            self._send(500, b"internal error", "text/plain")
        elif kind == "slow":
            time.sleep(self.slow_seconds)
            self._serve_file(rest)
        elif kind == "redirect-loop":
            self._send(302, b"", "text/plain", {"Location": path})
        elif kind == "empty":
            self._send(200, b"", "image/jpeg")
        elif kind == "html":
            self._send(200, b"<!doctype html><html><body>not an image</body></html>", "text/html")
        elif kind == "truncated":
            self._serve_file(rest, transform=lambda b: b[: len(b) // 2])
        elif kind == "huge":
            self._send(200, huge_png(), "image/png")
        elif kind == "bomb-rgba":
            self._send(200, bomb_png(), "image/png")
        elif kind == "rgba-6000":
            self._send(200, bomb_png(6000), "image/png")
        elif kind == "endless":
            self._stream(iter(lambda: b"\xff" * 65536, None), "image/jpeg", limit=1 << 30)
        elif kind == "dribble":
            found = self._file(rest)
            body = found[0] if found else b"\xff\xd8\xff" * 100
            self._stream((body[i:i + 1] for i in range(len(body))), "image/jpeg", length=len(body), pause=1.0)
        elif kind == "gzip-encoded":
            self._serve_file(rest, {"Content-Encoding": "gzip"})
        else:
            self._send(404, b"unknown bad route", "text/plain")


def _make_handler(directory: str, slow_seconds: float, state: dict, lock: threading.Lock) -> type[_Handler]:
    """A handler class serving ``directory``, counting requests in ``state`` (under ``lock``)."""
    return type("Handler", (_Handler,), {"root": os.path.realpath(directory), "slow_seconds": slow_seconds,
                                         "state": state, "lock": lock})


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a sleeping /bad/slow/ request never blocks shutdown
    request_queue_size = 256  # many downloader threads connect at once


@contextmanager
def serve(directory: str, port: int = 0, host: str = "127.0.0.1",
          slow_seconds: float = 5.0) -> Iterator[LoopbackServer]:
    """Serve ``directory`` (plus the bad-case routes) on ``host:port`` until the block exits."""
    state: dict[str, int] = {}
    handler = _make_handler(directory, slow_seconds, state, threading.Lock())
    try:
        httpd = _Server((host, port), handler)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise CCRKError(f"cannot serve the demo corpus on {host}:{port}: the port is in use (another `make demo` "
                        "or demo server still running?). Stop it, or set corpus.port in the config -- a new port "
                        "changes the image urls, so the sources are acquired again under new versions") from None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              name="ccrk-loopback-server", daemon=True)
    thread.start()
    server = LoopbackServer(url=f"http://{host}:{httpd.server_address[1]}", directory=directory,
                            httpd=httpd, hits=state)
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.demo.server", description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    with serve(args.directory, port=args.port, host=args.host) as server:
        print(f"serving {os.path.abspath(args.directory)} at {server.url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
