"""Byte ranges of one remote file, read with checks: never more than was asked for.

A :class:`RangedReader` reads ``read(offset, length)`` from a remote file through a
transport (:class:`HttpTransport` for the Hugging Face Hub and plain HTTPS,
:class:`S3Transport` for ``s3://`` through s3fs) and holds every answer to the rules a
partial download needs:

* the server must answer a Range request with exactly that range (206 and a matching
  ``Content-Range``); a server that answers 200 with the whole file is refused before
  its body is read, never buffered;
* every range must carry the ETag the file had when it was first seen: a file replaced
  between two reads is refused, never stitched together from two versions;
* a response shorter than asked for (a truncated body, a reset connection), a 5xx or
  429 answer and a timeout are retried a bounded number of times with exponential
  backoff, then reported in one line;
* 401/403/404 are reported at once, in one line that says what to set.

No message ever holds a secret: transports are named by :func:`redact`\\ ed URLs, tokens
travel only in request headers, and error text is composed here, not copied from a
server or a client library.

``EMBEDDING_DISSECT_TIMEOUT`` (seconds a server may stay silent, default 30) and
``EMBEDDING_DISSECT_RETRIES`` (tries after the first, default 4) tune the network rules.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Protocol
from urllib.parse import urlsplit, urlunsplit

from pipeline.core.errors import DissectError

TIMEOUT_ENV = "EMBEDDING_DISSECT_TIMEOUT"
RETRIES_ENV = "EMBEDDING_DISSECT_RETRIES"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 4
BACKOFF_S = 0.5  # first wait; doubled on every retry
MAX_BACKOFF_S = 8.0


def timeout_s() -> float:
    return _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float)


def retries() -> int:
    return int(_env_number(RETRIES_ENV, DEFAULT_RETRIES, int))


def _env_number(name: str, default, kind):
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise DissectError(f"{name}={raw!r} is not a number; unset it or set it to a positive number") from None
    if value < 0:
        raise DissectError(f"{name}={raw!r} is negative; set it to a positive number")
    return value


def redact(url: str) -> str:
    """``url`` without user, password, query or fragment: what may be shown and stored."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def normalise_etag(etag: str | None) -> str | None:
    """An ETag without its weak marker and quotes, so HEAD and GET answers compare equal."""
    if etag is None:
        return None
    return re.sub(r'^W/', "", etag.strip()).strip('"') or None


@dataclass(frozen=True)
class RemoteStat:
    """What a metadata request says about a remote file."""

    size: int
    etag: str | None
    commit: str | None = None  # the Hub's commit the file was resolved at


def http_client_module():
    """The HTTP client module huggingface_hub's session comes from (httpx, or httpx2 in
    later releases): both name their errors and timeouts alike."""
    from huggingface_hub.utils import get_session

    return importlib.import_module(type(get_session()).__module__.split(".")[0])


class RetryableError(Exception):
    """A transient failure of one request (5xx, reset, timeout, truncated body): try again."""


class Transport(Protocol):
    name: str  # how messages name the file: never holds a secret

    def stat(self) -> RemoteStat: ...

    def get(self, start: int, stop: int) -> tuple[bytes, str | None]:
        """Bytes ``[start, stop)`` and the ETag the answer carried; raises
        :class:`RetryableError` for transient failures, :class:`DissectError` for others."""
        ...


class RangedReader:
    """``read(offset, length)`` over a transport, each range checked (see the module docstring)."""

    def __init__(self, transport: Transport, stat: RemoteStat | None = None, *, tries: int | None = None,
                 backoff_s: float = BACKOFF_S, sleep: Callable[[float], None] = time.sleep):
        self.transport = transport
        self.stat = stat or transport.stat()
        self.tries = 1 + (retries() if tries is None else tries)
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.etag = normalise_etag(self.stat.etag)  # what every range must carry
        self.requests = 0
        self.bytes_received = 0

    @property
    def size(self) -> int:
        return self.stat.size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DissectError(
                f"{self.transport.name}: bytes {offset}..{offset + length} lie outside the file ({self.size} bytes); "
                "the file is damaged or not the format configured"
            )
        if length == 0:
            return b""
        last: RetryableError | None = None
        for attempt in range(self.tries):
            if attempt:
                self.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            self.requests += 1
            try:
                data, etag = self.transport.get(offset, offset + length)
            except RetryableError as error:
                last = error
                continue
            self._check(data, etag, offset, length)
            self.bytes_received += len(data)
            return data
        raise DissectError(
            f"{self.transport.name}: bytes {offset}..{offset + length} failed after {self.tries} tries ({last}); "
            "check the network or the server and run again"
        )

    def _check(self, data: bytes, etag: str | None, offset: int, length: int) -> None:
        etag = normalise_etag(etag)
        if etag is not None:
            if self.etag is None:
                self.etag = etag  # the first answer pins the version every later range must match
            elif etag != self.etag:
                raise DissectError(
                    f"{self.transport.name} changed while it was being read (ETag {self.etag} became {etag}); "
                    "run again to read the new version"
                )
        if len(data) != length:
            raise DissectError(f"{self.transport.name}: asked for {length} bytes at {offset}, got {len(data)}; the server is misbehaving")


# ---- HTTP(S), and the Hugging Face Hub ---------------------------------------------------------


class HttpTransport:
    """Range GETs over HTTP(S) with huggingface_hub's own HTTP client and session.

    ``headers`` carry the credentials (the Hub's ``Authorization``); they are sent, never
    shown. ``hint_auth`` is the fix a 401/403 names.
    """

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, stat: RemoteStat | None = None,
                 hint_auth: str = "check the URL's access rights", session=None):
        self.url = url
        self.name = redact(url)
        self.headers = {**(headers or {}), "Accept-Encoding": "identity"}
        self._stat = stat
        self.hint_auth = hint_auth
        self._session = session

    @property
    def session(self):
        if self._session is None:
            from huggingface_hub.utils import get_session

            self._session = get_session()
        return self._session

    def _timeout(self):
        http = http_client_module()
        seconds = timeout_s()
        return http.Timeout(seconds, connect=min(seconds, 10.0))

    def stat(self) -> RemoteStat:
        if self._stat is not None:
            return self._stat
        response = self._send("HEAD", {})
        size = response.headers.get("Content-Length")
        if size is None or not size.isdigit():
            raise DissectError(f"{self.name}: the server does not say the file's size (no Content-Length); download it and set source.path")
        return RemoteStat(size=int(size), etag=response.headers.get("ETag") or _last_modified(response))

    def _send(self, method: str, extra: dict[str, str]):
        http = http_client_module()
        for attempt in range(1 + retries()):
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = self.session.request(method, self.url, headers={**self.headers, **extra},
                                                timeout=self._timeout(), follow_redirects=True)
            except http.TimeoutException:
                error = "timed out"
                continue
            except http.TransportError as failure:
                error = type(failure).__name__
                continue
            if response.status_code >= 500 or response.status_code == 429:
                error = f"HTTP {response.status_code}"
                continue
            self._raise_for_status(response.status_code)
            return response
        raise DissectError(f"{self.name}: {method} failed after {1 + retries()} tries ({error}); check the network or the server and run again")

    def _raise_for_status(self, status: int) -> None:
        if status in (401, 403):
            raise DissectError(f"{self.name}: access refused (HTTP {status}); {self.hint_auth}")
        if status == 404:
            raise DissectError(f"{self.name} does not exist (HTTP 404); check the URL, repo, revision and file name")
        if status >= 400:
            raise DissectError(f"{self.name}: the server answered HTTP {status}; check the URL")

    def get(self, start: int, stop: int) -> tuple[bytes, str | None]:
        http = http_client_module()
        want = stop - start
        headers = {**self.headers, "Range": f"bytes={start}-{stop - 1}"}
        try:
            with self.session.stream("GET", self.url, headers=headers, timeout=self._timeout(), follow_redirects=True) as response:
                status = response.status_code
                if status >= 500 or status == 429:
                    raise RetryableError(f"HTTP {status}")
                if status == 200:
                    # The whole file is coming: close the connection before its body is read.
                    raise DissectError(
                        f"{self.name}: the server ignored the byte-range request and answered with the whole file (HTTP 200); "
                        "it cannot be read by range: download the file and set source.path to it"
                    )
                self._raise_for_status(status)
                if status != 206:
                    raise DissectError(f"{self.name}: the server answered a byte-range request with HTTP {status}; check the URL")
                expected = f"bytes {start}-{stop - 1}/"
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(expected):
                    raise DissectError(
                        f"{self.name}: asked for bytes {start}-{stop - 1}, the server sent {content_range or 'no Content-Range'}; "
                        "it does not honour byte ranges: download the file and set source.path to it"
                    )
                body = bytearray()
                for chunk in response.iter_raw(1 << 20):
                    body += chunk
                    if len(body) > want:
                        raise DissectError(f"{self.name}: the server sent more than the {want} bytes asked for; it does not honour byte ranges")
                etag = response.headers.get("ETag")
        except http.TimeoutException:
            raise RetryableError(f"no answer within {timeout_s():g} s") from None
        except http.RemoteProtocolError:  # the body ended before its Content-Length
            raise RetryableError("truncated answer: the connection closed before the whole range arrived") from None
        except http.TransportError as failure:  # reset, refused
            raise RetryableError(f"connection failed: {type(failure).__name__}") from None
        if len(body) < want:
            raise RetryableError(f"truncated answer: {len(body)} of {want} bytes")
        return bytes(body), etag


def _last_modified(response) -> str | None:
    """Without an ETag, size and Last-Modified stand in for the file's version."""
    modified = response.headers.get("Last-Modified")
    return f"{response.headers.get('Content-Length')}-{modified}" if modified else None


# ---- S3 ---------------------------------------------------------------------------------------


class S3Transport:
    """Range reads of one S3 object through s3fs, each with ``IfMatch`` on the object's ETag.

    Credentials and the endpoint come from the environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``,
    ...), never from the config.
    """

    def __init__(self, url: str, fs=None):
        self.url = url
        self.name = redact(url)
        self.fs = fs or s3_filesystem()
        self._file = None

    def _open(self):
        if self._file is None:
            try:
                # cache_type "none": each read is one GET of exactly the bytes asked for;
                # s3fs sends IfMatch with the ETag it saw at open, so a replaced object fails.
                self._file = self.fs.open(self.url, "rb", cache_type="none")
            except FileNotFoundError:
                raise DissectError(f"{self.name} does not exist; check the bucket and key in source.url") from None
            except PermissionError:
                raise DissectError(f"{self.name}: access refused; set AWS credentials in the environment that can read it") from None
            except OSError as error:
                raise DissectError(f"{self.name}: cannot open it ({_s3_reason(error)}); check the endpoint and credentials") from None
        return self._file

    def stat(self) -> RemoteStat:
        details = self._open().details
        return RemoteStat(size=int(details["size"]), etag=details.get("ETag"))

    def get(self, start: int, stop: int) -> tuple[bytes, str | None]:
        handle = self._open()
        try:
            handle.seek(start)
            data = handle.read(stop - start)
        except PermissionError:
            raise DissectError(f"{self.name}: access refused; set AWS credentials in the environment that can read it") from None
        except FileNotFoundError:
            raise DissectError(f"{self.name} no longer exists; check source.url") from None
        except OSError as error:
            if "pre-condition" in str(error).lower() or type(error).__name__ == "FileExpired":
                raise DissectError(f"{self.name} changed while it was being read (its ETag changed); run again to read the new version") from None
            raise RetryableError(_s3_reason(error)) from None
        except Exception as error:  # noqa: BLE001 - botocore's connection and read errors
            raise RetryableError(type(error).__name__) from None
        if len(data) < stop - start:
            raise RetryableError(f"truncated answer: {len(data)} of {stop - start} bytes")
        return data, handle.details.get("ETag")


def _s3_reason(error: BaseException) -> str:
    return type(error).__name__ if not error.args else f"{type(error).__name__}: {str(error.args[0])[:80]}"


def s3_filesystem():
    """An s3fs filesystem configured from the environment alone, without caches between calls."""
    try:
        import s3fs
    except ImportError:
        raise DissectError("s3:// sources need s3fs: pip install s3fs") from None
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.retries = 1  # the reader retries, bounded, with its own backoff
    return fs
