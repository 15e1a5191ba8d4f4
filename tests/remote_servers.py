"""Real servers on localhost for the remote sources: a Hub look-alike and moto's S3.

``HubServer`` is an ``http.server`` in a thread that serves the Hugging Face Hub's URL
layout, enough for huggingface_hub's own code to run against it through ``HF_ENDPOINT``:

* ``GET /api/models/{repo}/revision/{rev}``: ``{"id", "sha", "siblings": [{"rfilename"}]}``;
* ``HEAD|GET /{repo}/resolve/{rev}/{file}``: ``ETag``, ``X-Repo-Commit``,
  ``X-Linked-Etag``, ``X-Linked-Size``, and byte ranges (``206`` + ``Content-Range``);
* errors as the Hub gives them (``X-Error-Code: RepoNotFound|RevisionNotFound|EntryNotFound|GatedRepo``).

Faults are injected per test through ``server.faults``; every request is logged with the
body bytes the server sent, so tests count transfers on the server's side.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Faults:
    status: int | None = None  # every request answers this (401, 403, 404, 500...)
    error_code: str | None = None  # X-Error-Code sent with `status`
    token: str | None = None  # a request without "Authorization: Bearer <token>" gets 401
    ignore_range: bool = False  # answer Range requests with 200 and the whole file
    fail_5xx: int = 0  # the next n data requests answer 503
    reset: int = 0  # the next n data requests send half the body, then reset the connection
    truncate: int = 0  # the next n data requests send half the body, then close cleanly
    change_etag_after: int | None = None  # after n data requests, the file's ETag changes
    slow_s: float = 0.0  # wait this long before answering data requests
    extra_bytes: int = 0  # send more than asked for


@dataclass
class Repo:
    branches: dict[str, str]  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]]  # commit -> {path: content}


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.log: list[tuple[str, str, int, int]] = []  # method, path, status, body bytes sent
        self.headers_seen: list[dict[str, str]] = []
        self.data_requests = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, repo: str, branch: str, files: dict[str, bytes], tags: tuple[str, ...] = ()) -> str:
        """Commit ``files`` on ``branch``; returns the commit id."""
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
        entry = self.repos.setdefault(repo, Repo({}, {}))
        entry.commits[commit] = dict(files)
        entry.branches[branch] = commit
        for tag in tags:
            entry.branches[tag] = commit
        return commit

    def sent(self, predicate=lambda method, path: True) -> int:
        return sum(n for method, path, _, n in self.log if predicate(method, path))

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _etag(content: bytes, salt: str = "") -> str:
    return hashlib.sha256(content + salt.encode()).hexdigest()


def _handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet; the server keeps its own log
            pass

        def _finish(self, status: int, headers: dict[str, str], body: bytes = b"", sent: int | None = None) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            with server.lock:  # logged before the answer goes out, so a client never sees an unlogged answer
                server.log.append((self.command, self.path, status, 0 if self.command == "HEAD" else (len(body) if sent is None else sent)))
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None = None) -> None:
            headers = {"Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            self._finish(status, headers, json.dumps({"error": code or str(status)}).encode())

        def do_HEAD(self):
            self._serve()

        def do_GET(self):
            self._serve()

        def _serve(self):
            with server.lock:
                server.headers_seen.append(dict(self.headers))
            faults = server.faults
            if faults.status is not None:
                return self._error(faults.status, faults.error_code)
            if faults.token is not None and self.headers.get("Authorization") != f"Bearer {faults.token}":
                return self._error(401, "RepoNotFound")
            path = unquote(self.path.split("?", 1)[0])
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/"):])
            if "/resolve/" in path:
                repo, rest = path.lstrip("/").split("/resolve/", 1)
                revision, _, file = rest.partition("/")
                return self._resolve(repo, revision, file)
            return self._error(404)

        def _api(self, rest: str):
            repo, _, revision = rest.partition("/revision/")
            entry = server.repos.get(repo)
            if entry is None:
                return self._error(401, "RepoNotFound")  # as the Hub does for anonymous callers
            commit = entry.branches.get(revision, revision if revision in entry.commits else None)
            if commit is None:
                return self._error(404, "RevisionNotFound")
            siblings = [{"rfilename": name} for name in sorted(entry.commits[commit])]
            self._finish(200, {"Content-Type": "application/json"},
                         json.dumps({"id": repo, "sha": commit, "siblings": siblings}).encode())

        def _resolve(self, repo: str, revision: str, file: str):
            entry = server.repos.get(repo)
            if entry is None:
                return self._error(401, "RepoNotFound")
            commit = entry.branches.get(revision, revision if revision in entry.commits else None)
            if commit is None:
                return self._error(404, "RevisionNotFound")
            content = entry.commits[commit].get(file)
            if content is None:
                return self._error(404, "EntryNotFound")
            faults = server.faults
            salt = ""
            if self.command == "GET":
                with server.lock:
                    server.data_requests += 1
                    count = server.data_requests
                if faults.change_etag_after is not None and count > faults.change_etag_after:
                    salt = "changed"
            etag = _etag(content, salt)
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "X-Linked-Etag": f'"{etag}"',
                       "X-Linked-Size": str(len(content)), "Accept-Ranges": "bytes"}
            if self.command == "HEAD":
                return self._finish(200, {**headers, "Content-Length": str(len(content))})
            if faults.slow_s:
                time.sleep(faults.slow_s)
            if faults.fail_5xx > 0:
                faults.fail_5xx -= 1
                return self._error(503)
            ranged = self.headers.get("Range")
            if ranged is None or faults.ignore_range:
                return self._stream(200, headers, content)
            start_s, _, stop_s = ranged.removeprefix("bytes=").partition("-")
            start, stop = int(start_s), min(int(stop_s), len(content) - 1)
            body = content[start : stop + 1 + faults.extra_bytes]
            headers["Content-Range"] = f"bytes {start}-{stop}/{len(content)}"
            if faults.reset > 0 or faults.truncate > 0:
                return self._cut(headers, body)
            self._finish(206, headers, body)

        def _stream(self, status: int, headers: dict[str, str], content: bytes) -> None:
            """The whole file, written in pieces; a client that hangs up early is counted as such."""
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(content))}.items():
                self.send_header(key, value)
            self.end_headers()
            sent = 0
            try:
                for start in range(0, len(content), 64 * 1024):
                    self.wfile.write(content[start : start + 64 * 1024])
                    sent += min(64 * 1024, len(content) - start)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            with server.lock:
                server.log.append((self.command, self.path, status, sent))

        def _cut(self, headers: dict[str, str], body: bytes) -> None:
            faults = server.faults
            reset = faults.reset > 0
            if reset:
                faults.reset -= 1
            else:
                faults.truncate -= 1
            self.send_response(206)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            half = body[: len(body) // 2]
            with server.lock:
                server.log.append((self.command, self.path, 206, len(half)))
            self.wfile.write(half)
            self.wfile.flush()
            if reset:  # RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    return Handler


# ---- moto's S3 server -------------------------------------------------------------------------


@dataclass
class S3Server:
    url: str
    log: Path
    process: subprocess.Popen = field(repr=False)

    def sent(self, method: str = "GET") -> int:
        return sum(int(line.split()[-1]) for line in self.log.read_text().splitlines() if line.startswith(method + " "))

    def requests(self, method: str = "GET") -> int:
        return sum(1 for line in self.log.read_text().splitlines() if line.startswith(method + " "))

    def reset_log(self) -> None:
        self.log.write_text("")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-not-real",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask the (non-local) instance metadata service
}


def start_s3_server(log: Path) -> S3Server:
    """moto's S3 server as a subprocess on a free localhost port, logging its transfers."""
    port = free_port()
    log.write_text("")
    env = {**os.environ, **S3_ENV}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "s3_server.py"), str(port), str(log)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    ready = process.stdout.readline().decode().strip()
    if ready != "ready":
        process.kill()
        raise RuntimeError("moto's S3 server did not start")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    return S3Server(url=url, log=log, process=process)
