"""Remote sources against real servers on localhost: a Hub look-alike through huggingface_hub
(``HF_ENDPOINT``), plain HTTP range reads, and moto's S3 server through s3fs.

Every byte count is the server's own: what it logged as sent, never what the client says.
No test reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save

from pipeline.core.errors import DissectError, run_stage
from pipeline.core.params import model_config
from pipeline.core.parquet import read_provenance, read_vectors
from pipeline.core.paths import ModelPaths
from pipeline.formats import read_embedding
from pipeline.sources import synthetic
from pipeline.sources.remote import fetch_remote
from pipeline.stages import extract, fetch
from tests.remote_servers import S3_ENV, HubServer, start_s3_server
from tests.test_extract import WORDPIECE

REPO = "acme/tiny"
EMBED = "model.embed_tokens.weight"
FAKE_TOKEN = "hf_FAKEsecretTOKENdoNotLeak0123456789"
VOCAB, DIM = 512, 64


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        EMBED: rng.standard_normal((VOCAB, DIM), dtype=np.float32),  # 128 KiB
        "model.layers.0.mlp.weight": rng.standard_normal((1024, 1024), dtype=np.float32),  # 4 MiB never read
        "model.norm.weight": np.ones(DIM, dtype=np.float32),
    }


def tiny_repo_files(seed: int = 0) -> dict[str, bytes]:
    return {
        "model.safetensors": save(tiny_tensors(seed), metadata={"format": "pt"}),
        "tokenizer.json": json.dumps(WORDPIECE).encode(),
        "config.json": b"{}",
    }


def header_bytes(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache, no retries' waiting, no token from the machine."""
    monkeypatch.setenv("EMBEDDING_DISSECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no login cache of the machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("EMBEDDING_DISSECT_RETRIES", "3")
    monkeypatch.setattr("pipeline.sources.ranged.BACKOFF_S", 0.01)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def hub(env, monkeypatch):
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def hf_entry(revision: str = "main", fmt: str = "safetensors", **hf) -> dict:
    return {"format": fmt, "source": {"hf": {"repo": REPO, "revision": revision, **hf}}, "tokenizer": None, "tensor": None}


def run_fetch(entry: dict, name: str = "m") -> tuple[ModelPaths, dict]:
    params = {"models": {name: entry}}
    paths = ModelPaths.in_project(name)
    return paths, fetch.run(paths, model_config(params, name))


def run_both(entry: dict, name: str = "m") -> tuple[ModelPaths, dict, dict]:
    params = {"models": {name: entry}, "extract": {"row_group_size": 128, "compression_level": 3}}
    paths, manifest = run_fetch(entry, name)
    return paths, manifest, extract.run(paths, extract.read_settings(params, name))


def data_sent(server: HubServer) -> int:
    return server.sent(lambda method, path: method == "GET" and "/resolve/" in path)


# ---- the Hub, end to end --------------------------------------------------------------------


def test_hub_model_reads_only_header_embedding_and_tokenizer(hub):
    files = tiny_repo_files()
    commit = hub.add(REPO, "main", files)
    paths, manifest, record = run_both(hf_entry("main"))

    _, matrix = read_vectors(paths.embeddings)
    np.testing.assert_array_equal(matrix, tiny_tensors()[EMBED])
    model = files["model.safetensors"]
    embedding_bytes = VOCAB * DIM * 4
    budget = 1.02 * embedding_bytes + header_bytes(model) + len(files["tokenizer.json"])
    assert data_sent(hub) <= budget
    assert data_sent(hub) < len(model) / 10  # the 4 MiB layer never crossed the wire

    # The branch is resolved to its commit, written to the manifest and to the provenance.
    assert manifest["source"] == {"hf": REPO, "revision": "main", "commit": commit, "endpoint": hub.url}
    weights = next(f for f in manifest["files"] if f["path"].endswith("model.safetensors"))
    assert weights["commit"] == commit and weights["read"] == "ranges" and weights["source"] == f"hf://{REPO}@{commit}/model.safetensors"
    assert weights["etag"] and weights["bytes"] == len(model)
    read = b"".join(model[a:b] for a, b in weights["ranges"])
    import hashlib

    assert weights["sha256"] == hashlib.sha256(read).hexdigest()
    assert [f["commit"] for f in record["source_files"]] == [commit]
    assert read_provenance(paths.embeddings)["source_files"][0]["commit"] == commit


def test_a_rerun_sends_no_data_and_a_new_commit_is_fetched_again(hub):
    hub.add(REPO, "main", tiny_repo_files(0))
    _, first, _ = run_both(hf_entry("main"))
    before = data_sent(hub)
    hub.log.clear()
    paths, again, _ = run_both(hf_entry("main"))
    assert again == first
    assert data_sent(hub) == 0  # metadata requests only
    assert all(method == "HEAD" or "/api/" in path for method, path, _, _ in hub.log)

    new_commit = hub.add(REPO, "main", tiny_repo_files(1))  # the branch moves on
    hub.log.clear()
    paths, moved, _ = run_both(hf_entry("main"))
    assert moved["source"]["commit"] == new_commit != first["source"]["commit"]
    assert 0 < data_sent(hub) <= before
    np.testing.assert_array_equal(read_vectors(paths.embeddings)[1], tiny_tensors(1)[EMBED])


def test_a_tag_and_a_commit_resolve_to_the_same_commit(hub):
    commit = hub.add(REPO, "main", tiny_repo_files(), tags=("v1.0",))
    _, by_tag = run_fetch(hf_entry("v1.0"), "by-tag")
    _, by_commit = run_fetch(hf_entry(commit), "by-commit")
    assert by_tag["source"]["commit"] == by_commit["source"]["commit"] == commit


def test_sharded_safetensors_reads_only_the_shard_holding_the_embedding(hub):
    tensors = tiny_tensors()
    first = save({k: v for k, v in tensors.items() if k != EMBED})
    second = save({EMBED: tensors[EMBED]})
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors if k != EMBED}
             | {EMBED: "model-00002-of-00002.safetensors"}}
    hub.add(REPO, "main", {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second,
                           "model.safetensors.index.json": json.dumps(index).encode(), "tokenizer.json": json.dumps(WORDPIECE).encode()})
    paths, manifest, _ = run_both(hf_entry())
    np.testing.assert_array_equal(read_vectors(paths.embeddings)[1], tensors[EMBED])
    assert not any("00001" in path for method, path, _, _ in hub.log if method == "GET")
    ranges = {Path(f["path"]).name: f["ranges"] for f in manifest["files"]}
    assert set(ranges) == {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                           "model-00002-of-00002.safetensors", "tokenizer.json"}
    assert ranges["model-00001-of-00002.safetensors"] == []  # laid out as a hole: the reader wants it present
    assert {Path(f["path"]).name for f in read_provenance(paths.embeddings)["source_files"]} == {
        "model.safetensors.index.json", "model-00002-of-00002.safetensors"}


def write_small_gguf(path: Path) -> np.ndarray:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", gguf.quantize(table, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((512, 1024)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return table


def test_gguf_reads_the_header_then_only_token_embd(hub, tmp_path):
    local = tmp_path / "local.gguf"
    write_small_gguf(local)
    blob = local.read_bytes()
    hub.add(REPO, "main", {"model.gguf": blob})
    weights, files, _ = fetch_remote({"hf": {"repo": REPO}}, "gguf", None, False, tmp_path / "models" / "g", "models.g.source")
    np.testing.assert_array_equal(read_embedding("gguf", weights).matrix, read_embedding("gguf", local).matrix)
    contents = gguf.GGUFReader(local)
    embd = next(t for t in contents.tensors if t.name == "token_embd.weight")
    header = int(embd.data_offset)
    assert data_sent(hub) <= 1.02 * int(embd.n_bytes) + max(16 * 1024, 2 * header)  # the header, read in a doubling prefix
    assert data_sent(hub) < len(blob) / 2


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_reads_the_zip_directory_pickle_and_one_storage(hub, tmp_path, n_shards):
    layout = synthetic.small_layout(vocab_size=1024, dim=128, n_layers=4)
    local = tmp_path / "meta"
    synthetic.write_meta_checkpoint(local, layout, seed=0, n_shards=n_shards, progress=False)
    files = {f"original/{p.name}": p.read_bytes() for p in sorted(local.iterdir())}
    hub.add(REPO, "main", files)
    weights, fetched, _ = fetch_remote({"hf": {"repo": REPO}}, "meta", None, False, tmp_path / "models" / "meta", "models.meta.source")
    assert weights == tmp_path / "models" / "meta" / "remote" / "original"
    np.testing.assert_array_equal(read_embedding("meta", weights).matrix, read_embedding("meta", local).matrix)
    embedding_bytes = layout.vocab_size * layout.dim * 2
    total = sum(len(v) for v in files.values())
    assert data_sent(hub) <= 1.02 * embedding_bytes + 64 * 1024 * n_shards + len(files["original/params.json"])
    assert data_sent(hub) < total / 3


# ---- faults -----------------------------------------------------------------------------------


def fetch_error(entry: dict | None = None) -> str:
    with pytest.raises(DissectError) as caught:
        run_fetch(entry or hf_entry())
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_repo_revision_and_file_are_one_line_each(hub):
    hub.add(REPO, "main", tiny_repo_files())
    assert "acme/nope" in fetch_error({**hf_entry(), "source": {"hf": {"repo": "acme/nope"}}})
    message = fetch_error(hf_entry("no-such-branch"))
    assert "revision 'no-such-branch' is not in acme/tiny" in message
    message = fetch_error(hf_entry(files=["model.safetensors", "missing.bin"]))
    assert "missing.bin is not in acme/tiny" in message


def test_entry_missing_on_the_server_is_a_404_line(hub):
    hub.add(REPO, "main", tiny_repo_files())
    hub.faults.status, hub.faults.error_code = 404, "EntryNotFound"
    message = fetch_error()
    assert "404" in message or "does not exist" in message


@pytest.mark.parametrize("status,code", [(401, None), (403, None), (403, "GatedRepo")])
def test_refused_access_says_to_set_hf_token_or_accept_the_licence(hub, status, code):
    hub.add(REPO, "main", tiny_repo_files())
    hub.faults.status, hub.faults.error_code = status, code
    message = fetch_error()
    assert "HF_TOKEN" in message and "licence" in message


def test_a_token_from_the_environment_is_sent_and_never_written(hub, monkeypatch, capsys, tmp_path):
    hub.add(REPO, "main", tiny_repo_files())
    hub.faults.token = FAKE_TOKEN
    message = fetch_error()  # no token: refused
    assert "HF_TOKEN" in message
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    paths, manifest, _ = run_both(hf_entry())
    assert any({k.lower(): v for k, v in h.items()}.get("authorization") == f"Bearer {FAKE_TOKEN}" for h in hub.headers_seen)
    # A wrong token: the error names neither token.
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN + "-wrong")
    hub.faults.token = FAKE_TOKEN + "-other"
    with pytest.raises(SystemExit):
        _run_fetch_stage(tmp_path, hf_entry())
    captured = capsys.readouterr()
    assert "HF_TOKEN" in captured.err
    everything = captured.out + captured.err + message
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 1 << 20:
            everything += path.read_bytes().decode("utf-8", "replace")
    everything += json.dumps(read_provenance(paths.embeddings))
    everything += str(pq.read_schema(paths.embeddings).metadata)
    assert FAKE_TOKEN not in everything


def _run_fetch_stage(root: Path, entry: dict) -> None:
    import yaml

    (root / "params.yaml").write_text(yaml.safe_dump({"models": {"m": entry}}))
    run_stage(fetch.main, ["m"])


def test_a_token_in_the_config_is_refused_without_echoing_it(env):
    entry = hf_entry(token=FAKE_TOKEN)
    with pytest.raises(DissectError) as caught:
        model_config({"models": {"m": entry}}, "m")
    assert "HF_TOKEN" in str(caught.value) and FAKE_TOKEN not in str(caught.value)


@pytest.mark.parametrize("url", ["https://user:hunter2pass@example.org/m.gguf", "https://example.org/m.gguf?X-Amz-Signature=hunter2pass"])
def test_credentials_in_a_url_are_refused_without_echoing_them(env, url):
    entry = {"format": "gguf", "source": {"url": url}, "tokenizer": None, "tensor": None}
    with pytest.raises(DissectError) as caught:
        model_config({"models": {"m": entry}}, "m")
    assert "environment" in str(caught.value) and "hunter2pass" not in str(caught.value)


def test_a_server_ignoring_range_is_refused_not_downloaded(hub):
    hub.add(REPO, "main", tiny_repo_files())
    hub.faults.ignore_range = True
    message = fetch_error()
    assert "ignored the byte-range request" in message and "source.path" in message
    listed = [json.loads(p.read_text())["ranges"] for p in Path("cache").rglob("ranges.json")]
    assert all(ranges == [] for ranges in listed)


def test_5xx_and_resets_and_truncation_are_retried_then_succeed(hub, monkeypatch):
    monkeypatch.setenv("EMBEDDING_DISSECT_RETRIES", "6")
    hub.add(REPO, "main", tiny_repo_files())
    hub.faults.fail_5xx, hub.faults.reset, hub.faults.truncate = 2, 1, 1
    paths, _, _ = run_both(hf_entry())
    np.testing.assert_array_equal(read_vectors(paths.embeddings)[1], tiny_tensors()[EMBED])
    statuses = [status for method, path, status, _ in hub.log if method == "GET" and "/resolve/" in path]
    assert statuses.count(503) == 2


@pytest.mark.parametrize("fault,expected", [("fail_5xx", "HTTP 503"), ("truncate", "truncated"), ("reset", "connection")])
def test_a_fault_that_persists_ends_after_bounded_retries(hub, fault, expected):
    hub.add(REPO, "main", tiny_repo_files())
    setattr(hub.faults, fault, 1000)
    message = fetch_error()
    assert "failed after 4 tries" in message and expected in message
    assert sum(1 for method, path, _, _ in hub.log if method == "GET" and "/resolve/" in path) == 4


def test_a_file_that_changes_between_two_ranges_is_refused(hub):
    hub.add(REPO, "main", tiny_repo_files())
    hub.faults.change_etag_after = 1
    assert "changed while it was being read" in fetch_error()


def test_a_server_sending_more_than_asked_is_refused(hub):
    hub.add(REPO, "main", tiny_repo_files())
    hub.faults.extra_bytes = 100
    assert "more than the" in fetch_error()


def test_a_slow_server_times_out(hub, monkeypatch):
    hub.add(REPO, "main", tiny_repo_files())
    monkeypatch.setenv("EMBEDDING_DISSECT_TIMEOUT", "0.3")
    monkeypatch.setenv("EMBEDDING_DISSECT_RETRIES", "1")
    hub.faults.slow_s = 1.5
    message = fetch_error()
    assert "no answer within 0.3 s" in message and "2 tries" in message


def test_a_damaged_cache_range_is_fetched_again(hub):
    hub.add(REPO, "main", tiny_repo_files())
    paths, first, _ = run_both(hf_entry())
    cached = [p for p in Path("cache", "remote").rglob("model.safetensors")]
    (cached_file,) = cached
    with open(cached_file, "r+b") as handle:  # flip bytes inside the embedding
        handle.seek(first["files"][0]["ranges"][-1][0] + 10)
        handle.write(b"\xff\xff\xff\xff")
    hub.log.clear()
    paths, again, _ = run_both(hf_entry())
    assert again == first
    assert data_sent(hub) > 0
    np.testing.assert_array_equal(read_vectors(paths.embeddings)[1], tiny_tensors()[EMBED])


# ---- plain HTTPS (here HTTP on localhost) ------------------------------------------------------


def test_url_folder_with_files_over_http(hub):
    files = tiny_repo_files()
    hub.add(REPO, "main", files)
    entry = {"format": "safetensors", "tokenizer": None, "tensor": None,
             "source": {"url": f"{hub.url}/{REPO}/resolve/main/", "files": ["model.safetensors", "tokenizer.json"]}}
    paths, manifest, _ = run_both(entry)
    np.testing.assert_array_equal(read_vectors(paths.embeddings)[1], tiny_tensors()[EMBED])
    assert manifest["source"] == {"url": f"{hub.url}/{REPO}/resolve/main/"}
    assert data_sent(hub) <= 1.02 * VOCAB * DIM * 4 + header_bytes(files["model.safetensors"]) + len(files["tokenizer.json"])


def test_url_of_a_missing_file_is_one_line(hub):
    entry = {"format": "gguf", "tokenizer": None, "tensor": None, "source": {"url": f"{hub.url}/nothing/here.gguf"}}
    assert "does not exist (HTTP 404)" in fetch_error(entry)


# ---- S3 (moto's server) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_process(tmp_path_factory):
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "s3.log")
    yield server
    server.stop()


@pytest.fixture
def s3(env, s3_process, monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_process.url)
    s3_process.reset_log()
    return s3_process


def s3_put(server, bucket: str, files: dict[str, bytes], prefix: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for name, content in files.items():
        fs.pipe_file(f"{bucket}/{prefix}{name}", content)


def test_s3_bucket_folder_reads_only_what_is_needed(s3):
    files = tiny_repo_files()
    s3_put(s3, "models", files, "tiny/")
    s3.reset_log()
    entry = {"format": "safetensors", "tokenizer": None, "tensor": None, "source": {"url": "s3://models/tiny/"}}
    paths, manifest, _ = run_both(entry)
    np.testing.assert_array_equal(read_vectors(paths.embeddings)[1], tiny_tensors()[EMBED])
    budget = 1.02 * VOCAB * DIM * 4 + header_bytes(files["model.safetensors"]) + len(files["tokenizer.json"])
    assert s3.sent("GET") <= budget + 4096  # plus the bucket listing
    weights = next(f for f in manifest["files"] if f["path"].endswith("model.safetensors"))
    assert weights["source"] == "s3://models/tiny/model.safetensors" and weights["etag"]

    s3.reset_log()
    assert run_fetch(entry)[1] == manifest
    assert s3.sent("GET") <= 4096  # the listing only: no object data

    s3_put(s3, "models", {"model.safetensors": tiny_repo_files(1)["model.safetensors"]}, "tiny/")  # replaced
    s3.reset_log()
    paths, changed, _ = run_both(entry)
    assert changed != manifest and s3.sent("GET") > VOCAB * DIM * 4
    np.testing.assert_array_equal(read_vectors(paths.embeddings)[1], tiny_tensors(1)[EMBED])


def test_s3_missing_object_is_one_line(s3):
    s3_put(s3, "models", {"x": b"x"}, "")
    entry = {"format": "gguf", "tokenizer": None, "tensor": None, "source": {"url": "s3://models/none.gguf"}}
    assert "does not exist" in fetch_error(entry)


# ---- the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source,fragment", [
    ({"hf": "meta-llama/Llama-3.2-1B"}, "must be a mapping"),
    ({"hf": {"repo": "../etc"}}, "must be a Hub repo id"),
    ({"hf": {"repo": "a/b", "revision": ""}}, "must be a branch, tag or commit"),
    ({"hf": {"repo": "a/b", "files": "model.safetensors"}}, "must be a list of file paths"),
    ({"hf": {"repo": "a/b", "files": ["../x"]}}, "path inside the repo"),
    ({"hf": {"repo": "a/b", "branch": "main"}}, "unknown keys ['branch']"),
    ({"url": "ftp://host/model.gguf"}, "s3://bucket/key or https://host/path"),
    ({"url": "s3://b/m.gguf", "path": "/x"}, "exactly one of"),
])
def test_remote_sources_are_checked_before_any_request(source, fragment):
    entry = {"format": "gguf", "source": source, "tokenizer": None, "tensor": None}
    with pytest.raises(DissectError, match=re.escape(fragment)):
        model_config({"models": {"m": entry}}, "m")


def test_the_shipped_hub_model_config_is_valid():
    from tests.conftest import model_conf

    config = model_config({"models": {"llama-3-2-1b-hf": model_conf("llama-3-2-1b-hf")}}, "llama-3-2-1b-hf")
    assert config.source_kind == "hf" and config.source["hf"]["repo"] == "meta-llama/Llama-3.2-1B"


def test_an_s3_object_replaced_between_two_ranges_is_refused(s3):
    from pipeline.sources.ranged import RangedReader, S3Transport

    s3_put(s3, "models", {"blob": bytes(range(256)) * 64}, "")
    reader = RangedReader(S3Transport("s3://models/blob"))
    assert reader.read(10, 5) == bytes(range(10, 15))
    s3_put(s3, "models", {"blob": bytes(reversed(range(256))) * 64}, "")
    with pytest.raises(DissectError, match="changed while it was being read"):
        reader.read(100, 5)
