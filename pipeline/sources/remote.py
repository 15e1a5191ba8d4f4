"""Models where they live: a Hugging Face Hub repo at a revision, or an ``s3://``/``https://`` URL.

Only the bytes the embedding needs cross the network:

* safetensors: the 8-byte header length and the header; with shards, the index first, to
  find the one shard that holds the embedding; then the tensor's bytes;
* GGUF: a growing prefix until the bounded header parser has the whole header (the
  tokenizer lives in its metadata), then ``token_embd.weight``'s bytes;
* Meta ``.pth``: the zip archive's end record and central directory, ``data.pkl`` and
  ``byteorder``, the storage member's local header, then the tensor's bytes;
* small files (tokenizer, ``params.json``, the shard index) whole.

Every range goes through :class:`~pipeline.sources.ranged.RangedReader` (checked, retried)
into the cache (:mod:`pipeline.sources.cache`), whose files keep each remote file's size
with the fetched bytes at their own offsets and holes elsewhere. ``models/<name>/remote/``
then holds a *view* of those files under their remote names (hard links into the cache,
or sparse copies where the cache lives on another file system), so the readers in
:mod:`pipeline.formats` open them as local files and all their checks run unchanged. The
planners here parse headers with the same parsers the readers use, so they fetch exactly
what the readers will touch.

Credentials come from the environment only (``HF_TOKEN`` or huggingface_hub's login
cache; the AWS variables for S3) and are never written: manifests name files by
``hf://repo@commit/file`` or by a URL without user, password or query.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pipeline.core.errors import DissectError
from pipeline.formats.base import choose_tensor_key
from pipeline.sources.cache import CachedFile, cache_key, merge_spans
from pipeline.sources.ranged import (
    HttpTransport, RangedReader, RemoteStat, S3Transport, http_client_module, redact, s3_filesystem, timeout_s,
)

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model")
GGUF_FIRST_PREFIX = 16 * 1024  # doubled until the header fits: at most the header size read beyond it
HF_ACCESS_HINT = (
    "set HF_TOKEN to a token that can read it (or run `hf auth login`), and if the model is gated "
    "accept its licence on its Hub page first"
)


@dataclass
class RemoteFile:
    """One remote file: its path in the repo or folder, and its cached copy."""

    path: str
    cached: CachedFile
    location: str  # hf://repo@commit/file or a redacted URL
    commit: str | None
    whole: bool = False


@dataclass
class RemoteModel:
    """A resolved source: its files by path, and how to open one."""

    listing: list[str]
    open_file: Callable[[str], RemoteFile]
    describe: dict[str, Any]  # what the manifest says about the source (no secrets)
    opened: dict[str, RemoteFile] = field(default_factory=dict)

    def file(self, path: str) -> RemoteFile:
        if path not in self.opened:
            self.opened[path] = self.open_file(path)
        return self.opened[path]


# ---- the Hugging Face Hub ---------------------------------------------------------------------


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_hub(spec: dict[str, Any], where: str) -> RemoteModel:
    """The repo at its revision: a branch or tag is resolved to its commit (one metadata call)."""
    from huggingface_hub import HfApi

    repo, revision = spec["repo"], str(spec.get("revision") or "main")
    endpoint = hub_endpoint()
    info = _hub_call(lambda: HfApi(endpoint=endpoint).model_info(repo, revision=revision, timeout=timeout_s()),
                     repo, revision, where)
    commit = info.sha
    if not commit:
        raise DissectError(f"{endpoint} did not say which commit {repo}@{revision} is; check HF_ENDPOINT")
    listing = [sibling.rfilename for sibling in (info.siblings or [])]

    def open_file(path: str) -> RemoteFile:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(repo, path, revision=commit, endpoint=endpoint)
        meta = _hub_call(lambda: get_hf_file_metadata(url, timeout=timeout_s(), endpoint=endpoint, retry_on_errors=True),
                         repo, revision, where, path)
        if meta.size is None:
            raise DissectError(f"{endpoint} did not say the size of {path} in {repo}@{commit}; check HF_ENDPOINT")
        stat = RemoteStat(size=meta.size, etag=meta.etag, commit=meta.commit_hash or commit)
        transport = HttpTransport(url, headers=build_hf_headers(), stat=stat, hint_auth=HF_ACCESS_HINT)
        # The Hub redirects large files to a CDN whose ETag is not the metadata's: the first
        # range pins the ETag every later range must carry; the commit pins the content.
        reader = RangedReader(transport, RemoteStat(size=stat.size, etag=None, commit=stat.commit))
        location = f"hf://{repo}@{commit}/{path}"
        cached = CachedFile(reader, cache_key(f"hf://{repo}@{commit}", path, stat.etag or ""))
        return RemoteFile(path=path, cached=cached, location=location, commit=commit)

    describe = {"hf": repo, "revision": revision, "commit": commit, "endpoint": redact(endpoint)}
    return RemoteModel(listing=listing, open_file=open_file, describe=describe)


def _hub_call(call: Callable[[], Any], repo: str, revision: str, where: str, path: str | None = None) -> Any:
    """``call()``, with the Hub's errors turned into one line naming the fix (never the token)."""
    from huggingface_hub import errors

    http = http_client_module()
    what = f"{path} in {repo}@{revision}" if path else f"{repo}@{revision}"
    try:
        return call()
    except errors.GatedRepoError:
        raise DissectError(f"{repo} is gated: {HF_ACCESS_HINT}") from None
    except errors.RevisionNotFoundError:
        raise DissectError(f"revision {revision!r} is not in {repo}; set {where}.hf.revision to a branch, tag or commit of it") from None
    except errors.RemoteEntryNotFoundError:
        raise DissectError(f"{what} does not exist (HTTP 404); check {where}.hf.files") from None
    except errors.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise DissectError(f"{what}: access refused (HTTP {status}); {HF_ACCESS_HINT}") from None
        if status == 404:
            raise DissectError(f"{what} does not exist (HTTP 404); check {where}.hf.repo and revision") from None
        raise DissectError(f"{what}: the Hub answered HTTP {status}; try again later or check HF_ENDPOINT") from None
    except (http.TransportError, OSError) as error:
        raise DissectError(f"cannot reach {redact(hub_endpoint())} ({type(error).__name__}); check the network or HF_ENDPOINT") from None


# ---- s3:// and https:// ------------------------------------------------------------------------


def resolve_url(url: str, files: list[str] | None, where: str) -> RemoteModel:
    """A file URL, or a folder URL (ending in '/') with its ``files`` (listed from S3 when not given)."""
    scheme = url.split("://", 1)[0]
    if url.endswith("/"):
        folder, name = url, None
    else:
        folder, name = url.rsplit("/", 1)
        folder += "/"
    fs = s3_filesystem() if scheme == "s3" else None
    if name is not None:
        listing = [name]
    elif files:
        listing = list(files)
    elif fs is not None:
        listing = _s3_listing(fs, folder)
    else:
        raise DissectError(f"{where}.url is a folder of an HTTPS server, which cannot be listed; set {where}.files to the files to read")

    def open_file(path: str) -> RemoteFile:
        target = folder + path
        transport = S3Transport(target, fs) if fs is not None else HttpTransport(target)
        stat = transport.stat()
        reader = RangedReader(transport, stat)
        cached = CachedFile(reader, cache_key(redact(folder), path, stat.etag or f"size={stat.size}"))
        return RemoteFile(path=path, cached=cached, location=redact(target), commit=None)

    return RemoteModel(listing=listing, open_file=open_file, describe={"url": redact(url)})


def _s3_listing(fs, folder: str) -> list[str]:
    prefix = folder[len("s3://"):]
    try:
        found = fs.find(prefix)
    except (PermissionError, OSError) as error:
        raise DissectError(f"cannot list {redact(folder)} ({type(error).__name__}); check the bucket, the endpoint and AWS credentials") from None
    listing = sorted(path[len(prefix):] for path in found)
    if not listing:
        raise DissectError(f"{redact(folder)} holds no files; check the bucket and prefix in source.url")
    return listing


# ---- which files, and which of their bytes --------------------------------------------------


def _parent(path: str) -> str:
    parent = str(PurePosixPath(path).parent)
    return "" if parent == "." else parent


def _in_dir(paths: list[str], folder: str) -> list[str]:
    return sorted(p for p in paths if _parent(p) == folder)


def _weights_folder(fmt: str, listing: list[str], where: str) -> str:
    """The repo folder holding the weights ('' for the top; else the first in name order)."""
    wanted = {
        "safetensors": lambda n: n.endswith(".safetensors") or n == INDEX_NAME,
        "gguf": lambda n: n.endswith(".gguf"),
        "meta": lambda n: n.startswith("consolidated.") and n.endswith(".pth"),
    }[fmt]
    folders = sorted({_parent(p) for p in listing if wanted(PurePosixPath(p).name)})
    if not folders:
        raise DissectError(f"no {fmt} weight files among {', '.join(listing[:8]) or 'no files'}; check {where} and the model's format")
    return "" if "" in folders else folders[0]


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def plan_and_fetch(model: RemoteModel, fmt: str, tensor: str | None, with_tokenizer: bool, where: str) -> tuple[str, list[RemoteFile]]:
    """Fetch what the reader needs; returns the weights' repo path ('' = the top folder) and the files."""
    folder = _weights_folder(fmt, model.listing, where)
    present = set(model.listing)
    files: list[RemoteFile] = []
    weights_path = folder
    if fmt == "safetensors":
        index = _join(folder, INDEX_NAME)
        if index in present:
            files.append(_whole(model.file(index)))
            shard, others = _shards_of(files[-1], tensor)
            files.append(_safetensors(model.file(_join(folder, shard)), tensor))
            # The reader wants every shard the index names in the folder: the others are
            # laid out as holes of their size (a metadata request each, no data).
            files.extend(model.file(_join(folder, other)) for other in others)
        else:
            names = [p for p in _in_dir(model.listing, folder) if p.endswith(".safetensors")]
            single = _join(folder, "model.safetensors")
            if single not in present and len(names) != 1:
                raise DissectError(f"{len(names)} .safetensors files and no {INDEX_NAME} in {folder or 'the top folder'}; set {where} files to the one to read")
            files.append(_safetensors(model.file(single if single in present else names[0]), tensor))
    elif fmt == "gguf":
        names = [p for p in _in_dir(model.listing, folder) if p.endswith(".gguf")]
        if len(names) != 1:
            raise DissectError(f"{len(names)} .gguf files in {folder or 'the top folder'} ({', '.join(names[:5])}); set {where} files to the one to read")
        files.append(_gguf(model.file(names[0]), tensor))
        weights_path = names[0]
    else:
        shards = [p for p in _in_dir(model.listing, folder) if PurePosixPath(p).name.startswith("consolidated.") and p.endswith(".pth")]
        key = tensor
        for shard in shards:
            remote = model.file(shard)
            key = _meta(remote, key)
            files.append(remote)
        params = _join(folder, "params.json")
        if params in present:
            files.append(_whole(model.file(params)))
    if with_tokenizer and fmt != "gguf":
        for name in TOKENIZER_NAMES:
            if _join(folder, name) in present:
                files.append(_whole(model.file(_join(folder, name))))
                break
    return weights_path, files


def _whole(remote: RemoteFile) -> RemoteFile:
    remote.cached.ensure(0, remote.cached.size, desc=f"fetch {remote.path}")
    remote.whole = True
    return remote


def _shards_of(index: RemoteFile, tensor: str | None) -> tuple[str, list[str]]:
    """The shard holding the embedding, and the other shards the index names."""
    from pipeline.formats.safetensors import read_weight_map

    weight_map = read_weight_map(index.cached.data)
    key = choose_tensor_key(sorted(weight_map), tensor, index.cached.data)
    names = sorted(set(weight_map.values()))
    for name in names:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise DissectError(f"{index.location} names the shard {name!r}, which is not a file name; the index is damaged")
    return weight_map[key], [name for name in names if name != weight_map[key]]


def _safetensors(remote: RemoteFile, tensor: str | None) -> RemoteFile:
    from pipeline.formats.safetensors import MAX_HEADER_BYTES, read_header

    cached = remote.cached
    if cached.size >= 8:
        (length,) = struct.unpack("<Q", cached.read(0, 8))
        if length <= MAX_HEADER_BYTES and 8 + length <= cached.size:
            cached.ensure(8, 8 + length, desc=f"fetch {remote.path} header")
    header = read_header(cached.data)  # the reader's own checks, on the bytes fetched
    key = choose_tensor_key(sorted(header.tensors), tensor, cached.data)
    begin, end = header.tensors[key]["data_offsets"]
    cached.ensure(header.data_start + begin, header.data_start + end, desc=f"fetch {key}")
    return remote


def _gguf(remote: RemoteFile, tensor: str | None) -> RemoteFile:
    from pipeline.formats.gguf_file import _NeedMore, parse

    cached = remote.cached
    prefix = GGUF_FIRST_PREFIX
    while True:
        size = min(prefix, cached.size)
        try:
            contents = parse(cached.read(0, size), cached.size, cached.data)
            break
        except _NeedMore:
            if size == cached.size:  # cannot happen: the parser checks lengths against the file
                raise DissectError(f"{remote.location} is a damaged GGUF file (header longer than the file)") from None
            prefix *= 2
    key = choose_tensor_key(sorted(contents.tensors), tensor, cached.data)
    info = contents.tensors[key]
    cached.ensure(info.offset, info.offset + info.nbytes, desc=f"fetch {key}")
    return remote


def _meta(remote: RemoteFile, tensor: str | None) -> str:
    from pipeline.formats.meta import embedding_span

    key, start, length = embedding_span(remote.cached.handle(), tensor, remote.cached.data)
    remote.cached.ensure(start, start + length, desc=f"fetch {key}")
    return key


# ---- the view in models/<name>/remote ----------------------------------------------------------


def build_view(files: list[RemoteFile], view: Path) -> None:
    """``view/<path>`` for every file: a hard link to its cached copy, else a sparse copy."""
    staging = view.with_name(view.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for remote in files:
        target = staging / PurePosixPath(remote.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(remote.cached.data, target)
        except OSError:
            _sparse_copy(remote.cached, target)
    shutil.rmtree(view, ignore_errors=True)
    staging.rename(view)


def _sparse_copy(cached: CachedFile, target: Path) -> None:
    with open(cached.data, "rb") as source, open(target, "wb") as out:
        out.truncate(cached.size)
        for begin, end in cached.present():
            source.seek(begin)
            out.seek(begin)
            remaining = end - begin
            while remaining:
                block = source.read(min(remaining, 16 * 1024 * 1024))
                out.write(block)
                remaining -= len(block)


def manifest_entry(remote: RemoteFile, view_path: str) -> dict[str, Any]:
    """What the manifest records of a remote file: where it came from, its version, which
    bytes were read and their sha256 (the whole file's when ``whole``)."""
    cached = remote.cached
    spans = [(0, cached.size)] if remote.whole else merge_spans(cached.used)
    return {
        "path": view_path,
        "bytes": cached.size,
        "sha256": cached.content_sha256(spans),
        "read": "whole" if remote.whole else "ranges",
        "ranges": [list(span) for span in spans],
        "source": remote.location,
        "commit": remote.commit,
        "etag": cached.key["version"] or None,
    }


def fetch_remote(source: dict[str, Any], fmt: str, tensor: str | None, with_tokenizer: bool, dest: Path,
                 where: str) -> tuple[Path, list[RemoteFile], dict[str, Any]]:
    """Resolve ``source`` (hf or url), fetch the bytes the reader needs, lay out the view.

    Returns the weights' local path (a file or folder in the view), the files, and the
    source's description for the manifest.
    """
    if fmt not in ("safetensors", "gguf", "meta"):
        raise DissectError(f"{fmt} models cannot be read by range yet; download the model and set {where}.path to it")
    if source.get("hf") is not None:
        model = resolve_hub(source["hf"], where)
        files = source["hf"].get("files")
    else:
        model = resolve_url(str(source["url"]), source.get("files"), where)
        files = None
    if files:
        missing = [f for f in files if f not in model.listing]
        if missing and source.get("hf") is not None:
            raise DissectError(f"{missing[0]} is not in {model.describe['hf']}@{model.describe['commit'][:12]}; check {where}.hf.files")
        model.listing = list(files)
    weights_path, fetched = plan_and_fetch(model, fmt, tensor, with_tokenizer, where)
    view = dest / "remote"
    build_view(fetched, view)
    weights = view / PurePosixPath(weights_path) if weights_path else view
    return weights, fetched, model.describe
