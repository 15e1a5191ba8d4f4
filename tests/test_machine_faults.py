"""Faults of the machine: a full disk, a read-only or forbidden folder, a file where a folder
should be. Each is one line naming the path and the cause (exit 2, no traceback); a stage's
outputs are replaced as a set or not at all; two runs never remove each other's temporaries.

Tests run as root, for whom a read-only folder is writable, so the faults are raised where
the kernel would raise them (``os.replace``, the temporary file) or come from /dev/full.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.core.io as io
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.io import atomic_path, output_set, write_bytes_atomic, write_json_atomic, written_path
from pipeline.core.parquet import write_table

ROOT = Path(__file__).resolve().parent.parent
OLD = b"output of an earlier run\n"


def fault(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def failing_after(real, calls: int, code: int):
    """``real`` that works ``calls`` times, then raises ``code`` like the kernel would."""
    count = {"n": 0}

    def call(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise fault(code)
        return real(*args, **kwargs)

    return call


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


# ---- one line naming the path and the cause --------------------------------------------------


@pytest.mark.parametrize(
    "code, cause",
    [
        (errno.ENOSPC, "no space left on the device"),
        (errno.EDQUOT, "the disk quota is exhausted"),
        (errno.EROFS, "the file system is read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "permission denied"),
    ],
)
@pytest.mark.parametrize("step", ["replace", "create"])
def test_each_write_fault_is_one_line_naming_the_path(tmp_path, monkeypatch, code, cause, step):
    target = tmp_path / "out" / "stats.json"
    target.parent.mkdir()
    target.write_bytes(OLD)
    if step == "replace":
        monkeypatch.setattr(io.os, "replace", failing_after(os.replace, 0, code))
    else:
        monkeypatch.setattr(io.tempfile, "mkstemp", failing_after(io.tempfile.mkstemp, 0, code))
    with pytest.raises(DissectError) as error:
        write_json_atomic(target, {"a": 1})
    assert str(error.value) == f"cannot write {target}: {cause}" + str(error.value).split(cause, 1)[1]
    assert "\n" not in str(error.value)
    assert target.read_bytes() == OLD and not temporaries(tmp_path)


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs the /dev/full device")
@pytest.mark.parametrize("writer", ["bytes", "parquet"])
def test_a_real_full_disk_from_any_writer(tmp_path, monkeypatch, writer):
    """The temporary is /dev/full, so the kernel itself answers ENOSPC to Python and to Arrow."""

    def full_temporary(destination: Path) -> Path:
        link = io._temporary_name(destination)
        link.symlink_to("/dev/full")
        return link

    monkeypatch.setattr(io, "_new_temporary", full_temporary)
    target = tmp_path / "table.parquet"
    target.write_bytes(OLD)
    with pytest.raises(DissectError, match=f"^cannot write {target}: no space left on the device"):
        if writer == "bytes":
            write_bytes_atomic(target, bytes(1 << 20))
        else:
            write_table(target, pa.table({"x": np.arange(1 << 18)}), {"stage": "test"})
    assert target.read_bytes() == OLD and not temporaries(tmp_path)
    assert Path("/dev/full").is_char_device()


def test_a_file_where_a_folder_should_be(tmp_path):
    (tmp_path / "artifacts").write_bytes(OLD)
    with pytest.raises(DissectError) as error:
        write_bytes_atomic(tmp_path / "artifacts" / "m" / "stats.json", b"{}")
    assert str(error.value) == (f"cannot write {tmp_path / 'artifacts' / 'm' / 'stats.json'}: {tmp_path / 'artifacts'} is a file "
                                "where a folder should be; move it away and run the stage again")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(DissectError, match="it is a folder where a file should be"):
        write_bytes_atomic(tmp_path / "folder.json", b"{}")


def test_a_stage_whose_folder_is_a_file_exits_2_with_one_line(tmp_path):
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "m").write_bytes(OLD)  # where fetch's folder should be
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    params = {"models": {"m": {"format": "gguf", "source": {"path": str(weights)}, "tokenizer": None, "tensor": None}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "EMBEDDING_DISSECT_NO_PROGRESS": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.fetch", "m"], cwd=project, env=environment,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0] == "error: cannot write models/m/manifest.json: models/m is a file where a folder should be; move it away and run the stage again"


def test_run_stage_tells_a_fault_outside_the_write_layer_in_one_line(capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit) as exit_code:
        run_stage(main, [])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err == "error: cannot write an output: no space left on the device; free some space and run the stage again\n"


def test_other_os_errors_stay_bugs_with_their_traceback():
    def main(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file", "x")

    with pytest.raises(FileNotFoundError):
        run_stage(main, [])


# ---- outputs replaced as a set ----------------------------------------------------------------


def test_a_fault_between_two_outputs_replaces_neither(tmp_path):
    first, second = tmp_path / "embeddings.parquet", tmp_path / "tokenizer.json"
    first.write_bytes(OLD)
    second.write_bytes(OLD)
    with pytest.raises(DissectError, match=f"cannot write {second}: no space left"):
        with output_set():
            write_bytes_atomic(first, b"new embeddings")
            assert first.read_bytes() == OLD  # not yet in place
            assert written_path(first).read_bytes() == b"new embeddings"
            with atomic_path(second):
                raise fault(errno.ENOSPC)
    assert first.read_bytes() == OLD and second.read_bytes() == OLD
    assert not temporaries(tmp_path)


def test_a_complete_set_replaces_every_output(tmp_path):
    files = [tmp_path / f"out{i}.json" for i in range(3)]
    files[0].write_bytes(OLD)
    with output_set():
        for i, path in enumerate(files):
            write_json_atomic(path, {"i": i})
        with output_set():  # a nested set joins the outer one
            write_bytes_atomic(tmp_path / "inner", b"x")
        assert not files[1].exists() and not (tmp_path / "inner").exists()
    assert [p.read_text() for p in files] == [f'{{\n  "i": {i}\n}}\n' for i in range(3)]
    assert (tmp_path / "inner").read_bytes() == b"x"
    assert not temporaries(tmp_path)
    assert written_path(files[0]) == files[0]


@settings(max_examples=60, deadline=None)
@given(outputs=st.integers(1, 4), existing=st.lists(st.booleans(), min_size=4, max_size=4),
       failing=st.one_of(st.none(), st.tuples(st.sampled_from(["write", "rename"]), st.integers(0, 3))))
def test_a_set_is_all_new_or_all_old(tmp_path_factory, outputs, existing, failing):
    folder = tmp_path_factory.mktemp("set")
    files = [folder / f"out{i}" for i in range(outputs)]
    for path, exists in zip(files, existing):
        if exists:
            path.write_bytes(OLD)
    before = {path: path.read_bytes() if path.exists() else None for path in files}
    real_replace = os.replace
    renames = {"n": 0}

    def replace(source, destination):  # the disk fills at the n-th rename of the set, once
        if failing and failing[0] == "rename" and Path(destination) in files:
            renames["n"] += 1
            if renames["n"] == failing[1] + 1:
                raise fault(errno.ENOSPC)
        return real_replace(source, destination)

    io.os.replace = replace
    try:
        with output_set():
            for index, path in enumerate(files):
                with atomic_path(path) as tmp:
                    if failing == ("write", index):
                        raise fault(errno.ENOSPC)
                    tmp.write_bytes(b"new %d" % index)
        failed = False
    except DissectError:
        failed = True
    finally:
        io.os.replace = real_replace
    after = {path: path.read_bytes() if path.exists() else None for path in files}
    happened = failing is not None and failing[1] < outputs
    assert failed == happened
    assert after == (before if happened else {path: b"new %d" % i for i, path in enumerate(files)})
    assert not list(folder.glob(".*.tmp"))


def test_extract_on_a_full_disk_keeps_both_old_outputs(tmp_path, monkeypatch, smollm2_gguf, capsys):
    """Today's failure: a new embeddings.parquet beside the old tokenizer.json."""
    from pipeline.stages import extract, fetch

    project = tmp_path / "project"
    out = project / "artifacts" / "m"
    out.mkdir(parents=True)
    for name in ("embeddings.parquet", "tokenizer.json"):
        (out / name).write_bytes(OLD)
    params = {"models": {"m": {"format": "gguf", "source": {"path": str(smollm2_gguf)}, "tokenizer": None, "tensor": None}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    run_stage(fetch.main, ["m"])
    real_write_bytes = Path.write_bytes

    def full_disk_for_the_tokenizer(self, data):
        if self.name.startswith(".tokenizer.json."):
            raise fault(errno.ENOSPC)
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_for_the_tokenizer)
    with pytest.raises(SystemExit) as exit_code:
        run_stage(extract.main, ["m"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot write {Path('artifacts/m/tokenizer.json')}: "
                                       "no space left on the device; free some space and run the stage again\n")
    assert (out / "embeddings.parquet").read_bytes() == OLD and (out / "tokenizer.json").read_bytes() == OLD
    assert not temporaries(out)


# ---- two runs of one stage --------------------------------------------------------------------


HOLDER = """
import sys
from pipeline.core.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"first run")
    print(tmp, flush=True)
    sys.stdin.readline()  # hold the temporary until told to finish
"""


def test_a_second_run_leaves_the_first_runs_temporary_alone(tmp_path):
    target = tmp_path / "embeddings.parquet"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], env=environment, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        in_flight = Path(first.stdout.readline().strip())
        assert in_flight.read_bytes() == b"first run" and f".{first.pid}." in in_flight.name
        write_bytes_atomic(target, b"second run")  # the second run, while the first still writes
        assert in_flight.exists()
        assert target.read_bytes() == b"second run"
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
    assert target.read_bytes() == b"first run"  # the first run completed: it was not cut off
    assert not temporaries(tmp_path)


def test_temporaries_of_dead_runs_are_removed(tmp_path):
    target = tmp_path / "stats.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left = [tmp_path / f".stats.json.{dead}.abcd1234.tmp", tmp_path / ".stats.json.k3j2h1g0.tmp"]  # a dead run's, an old-style name
    alive = tmp_path / f".stats.json.{os.getpid()}.zzzz9999.tmp"
    for path in (*left, alive):
        path.write_bytes(b"partial")
    others = [tmp_path / ".other.json.1.abcd.tmp", tmp_path / f".stats.json.bak.{dead}.abcd1234.tmp"]  # stats.json.bak's
    for path in others:
        path.write_bytes(b"another output's")
    write_json_atomic(target, {})
    assert not any(path.exists() for path in left)
    assert alive.exists() and all(path.exists() for path in others)
