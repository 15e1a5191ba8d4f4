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
from pipeline.core.paths import RESERVED_NAMES, ModelPaths, ProjectPaths
from pipeline.core.settings import shown, string, whole_number

PARAMS_FILE = Path("params.yaml")
FORMATS = ("meta", "safetensors", "gguf", "onnx")
SOURCE_KINDS = ("path", "pypi", "synthetic", "hf", "url")
HF_KEYS = ("repo", "revision", "files")
URL_SCHEMES = ("s3", "https", "http")
# A Hub repo id: an optional owner, then the name (what huggingface_hub accepts).
REPO_PATTERN = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# Sections of a stage's settings that a model's config may set for itself.
MODEL_STAGE_SECTIONS = ("undertrained",)
MODEL_KEYS = ("format", "source", "tokenizer", "tensor", *MODEL_STAGE_SECTIONS)
SOURCE_KEYS = {"path": ("path",), "pypi": ("pypi", "files"), "synthetic": ("synthetic", "seed", "step"), "from": ("from",),
               "hf": ("hf",), "url": ("url", "files")}
# The last step a synthetic checkpoint series can be asked for (each step is one noise draw).
MAX_SERIES_STEP = 10_000
PIN_PATTERN = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*")
SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
# A tokenizer: a file or folder, a pinned wheel's member, or another model's of the same run.
TOKENIZER_KINDS = ("path", "pypi", "from")
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
    entry: dict[str, Any]  # the model's mapping as params.yaml holds it

    @property
    def weights_entry(self) -> dict[str, Any]:
        """What says which weights and tokenizer are read (for provenance): the entry without
        the model's own stage settings (``undertrained:``), so changing those leaves the
        extracted matrix's file as it was."""
        return {key: value for key, value in self.entry.items() if key not in MODEL_STAGE_SECTIONS}
    # `tokenizer: {from: OTHER}`: the model of the run whose tokenizer this one uses.
    tokenizer_from: ModelConfig | None = None

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
    check_names(params)
    return params


def check_name(name: Any, what: str = "model", where: str | None = None) -> str:
    """``name`` if it is safe as a folder and a stage suffix; else one line saying what a name may hold."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        if isinstance(name, str) and "." in name and "/" not in name:
            hint = "; use '-' instead of '.'"
        elif isinstance(name, (int, float)) and not isinstance(name, bool):
            hint = "; YAML reads it as a number: quote it"
        else:
            hint = ""
        place = f" in {where}" if where else ""
        raise DissectError(f"{what} name {name!r}{place} is not {NAME_RULE}{hint}")
    return name


def check_names(params: dict[str, Any]) -> None:
    """Every name params.yaml gives (models, export.models, drift.pairs, series), checked before any
    stage runs: a name becomes a folder, so one bad name must stop every stage, not only its own."""
    models = params.get("models")
    if models is not None and not isinstance(models, dict):
        raise DissectError("models must map each model name to its config; recompose params.yaml with `python -m pipeline.core.params`")
    for name in models or {}:
        check_name(name, "model", "models")
        if name in RESERVED_NAMES:
            raise DissectError(f"model name {name!r} in models is reserved (artifacts/{name}/ holds every {name} output); rename the model")
    export = params.get("export")
    exported = export.get("models") if isinstance(export, dict) else None
    if isinstance(exported, list):  # any other type is refused with the export settings
        for name in exported:
            check_name(name, "model", "export.models")
    drift = params.get("drift")
    pairs = drift.get("pairs") if isinstance(drift, dict) else None
    if isinstance(pairs, dict):  # any other type is refused with the drift settings
        for name in pairs:
            check_name(name, "drift pair", "drift.pairs")
    series = params.get("series")
    if isinstance(series, dict):  # any other type is refused with the series settings
        for name in series:
            check_name(name, "series", "series")


def model_config(params: dict[str, Any], name: str) -> ModelConfig:
    check_name(name)
    models = params.get("models") or {}
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        raise DissectError(f"model {name!r} is not in params.yaml (models: {known}); add it with -S '+model@models.{name}={name}'")
    entry = models[name] or {}
    if not isinstance(entry, dict):
        raise DissectError(f"models.{name} must be a mapping with format:, source:, tokenizer: and tensor:, got {shown(entry)}")
    unknown = sorted(str(key) for key in entry if key not in MODEL_KEYS)
    if unknown:
        raise DissectError(f"models.{name}.{unknown[0]} is not a setting of a model (known: {', '.join(MODEL_KEYS)}); remove it or fix its spelling")
    fmt = entry.get("format")
    if fmt not in FORMATS:
        raise DissectError(f"models.{name}.format is {fmt!r}; set it to one of {', '.join(FORMATS)}")
    source = entry.get("source")
    source_kind(source, f"models.{name}.source")
    tokenizer = entry.get("tokenizer")
    tokenizer_from = None
    if tokenizer is not None and source_kind(tokenizer, f"models.{name}.tokenizer", allowed=TOKENIZER_KINDS) == "from":
        tokenizer_from = lender(params, name, tokenizer["from"])
    tensor = entry.get("tensor")
    if tensor is not None and not (isinstance(tensor, str) and tensor):
        raise DissectError(f"models.{name}.tensor must be a tensor name or null, got {shown(tensor)}")
    return ModelConfig(name=name, format=fmt, source=source, tokenizer=tokenizer, tensor=tensor, entry=entry,
                       tokenizer_from=tokenizer_from)


def lender(params: dict[str, Any], name: str, other: Any) -> ModelConfig:
    """The model of the run whose own tokenizer model ``name`` borrows (`tokenizer: {from: other}`)."""
    where = f"models.{name}.tokenizer.from"
    if not isinstance(other, str) or other == name:
        raise DissectError(f"{where} must name another model of the run, not {other!r}")
    check_name(other)
    if other not in (params.get("models") or {}):
        raise DissectError(f"{where} names {other!r}, which is not in params.yaml; add it to the run with "
                           f"-S '+model@models.{other}={other}'")
    config = model_config(params, other)
    if config.tokenizer_from is not None:
        raise DissectError(f"{where} names {other!r}, which itself takes its tokenizer from {config.tokenizer_from.name!r}; "
                           f"set it to {config.tokenizer_from.name!r}")
    if config.tokenizer is None and config.source_kind == "synthetic":
        raise DissectError(f"{where} names {other!r}, a synthetic checkpoint without a tokenizer of its own; name a model that has one")
    return config


def model_settings(params: dict[str, Any], name: str | None) -> ModelConfig:
    """The settings of the stages that read the model itself (fetch)."""
    return model_config(params, str(name))


def model_paths(params: dict[str, Any], name: str | None) -> ModelPaths:
    """The artifact layout of model ``name``, once the name is checked and found in params.yaml."""
    model_config(params, str(name))
    return ModelPaths.in_project(str(name))


def source_kind(source: Any, where: str, allowed: tuple[str, ...] = SOURCE_KINDS) -> str:
    """Which of ``allowed`` (``path:``, ``pypi:``, ``synthetic:``, ``hf:``, ``url:``, ``from:``) a source uses (exactly one), checked."""
    if not isinstance(source, dict):
        raise DissectError(f"{where} must be a mapping with one of {', '.join(k + ':' for k in allowed)}")
    kinds = [kind for kind in allowed if source.get(kind) is not None]
    if len(kinds) != 1:
        raise DissectError(f"{where} must set exactly one of {', '.join(k + ':' for k in allowed)} (got {sorted(map(str, source))})")
    kind = kinds[0]
    unknown = sorted(str(key) for key in source if key not in SOURCE_KEYS[kind])
    if unknown:
        raise DissectError(f"{where}.{unknown[0]} is not a setting of a {kind}: source (known: {', '.join(SOURCE_KEYS[kind])}); remove it")
    if kind == "path":
        string()(source["path"], f"{where}.path")
    elif kind == "pypi":
        if not isinstance(source["pypi"], str) or not PIN_PATTERN.fullmatch(source["pypi"]):
            raise DissectError(f"{where}.pypi must be pinned as 'package==version', got {shown(source['pypi'])}")
        check_pins(source.get("files"), f"{where}.files")
    elif kind == "from":
        check_name(source["from"], "model", f"{where}.from")
    elif kind == "hf":
        _check_hf(source["hf"], f"{where}.hf")
    elif kind == "url":
        _check_url(source, where)
    else:
        string()(source["synthetic"], f"{where}.synthetic")
        whole_number(0, 2**32 - 1)(source.get("seed", 0), f"{where}.seed")
        whole_number(0, MAX_SERIES_STEP)(source.get("step", 0), f"{where}.step")
    return kind


def check_pins(files: Any, where: str) -> dict[str, str]:
    """``source.files`` of a wheel: each member a path inside the wheel, each pin a sha256."""
    if not isinstance(files, dict) or not files:
        raise DissectError(f"{where} must map each file to unpack from the wheel to its sha256 (at least one), got {shown(files)}")
    unpacked_as: dict[str, str] = {}
    for member, digest in files.items():
        parts = member.split("/") if isinstance(member, str) else []
        if (not parts or member.startswith("/") or "\\" in member or ":" in parts[0]
                or any(part in ("", ".", "..") for part in parts) or any(ord(c) < 32 for c in member)):
            raise DissectError(
                f"{where} names {shown(member)}, which is not a file inside the wheel; give its path in the wheel "
                "like package/model.gguf (relative, no '.' or '..' parts)"
            )
        if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
            raise DissectError(f"{where}.{member} must be the file's sha256 (64 hex digits), got {shown(digest)}")
        name = parts[-1]
        if name in unpacked_as:
            raise DissectError(f"{where} names {unpacked_as[name]!r} and {member!r}, which would both unpack as {name}; keep one")
        unpacked_as[name] = member
    return files


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


USAGE = (
    "usage: python -m pipeline.core.params [OVERRIDE ...]\n"
    "Compose conf/ into params.yaml as DVC does; OVERRIDEs as `dvc exp run -S` takes them "
    "(quantize.recall_k=20, '+model@models.NAME=NAME')."
)


def asks_for_help(argv: list[str]) -> bool:
    """Whether a command line asks for its usage (``-h`` or ``--help`` anywhere in it)."""
    return any(arg in ("-h", "--help") for arg in argv)


def main(argv: list[str]) -> None:
    from hydra.errors import HydraException

    from pipeline.core.io import write_bytes_atomic

    if asks_for_help(argv):
        print(USAGE)
        return
    try:
        text = compose(argv)
    except HydraException as error:
        raise DissectError(f"cannot compose conf/ with {' '.join(argv)!r}: {_composition_fault(error)}") from None
    write_bytes_atomic(PARAMS_FILE, text.encode("utf-8"))


def _composition_fault(error: Exception) -> str:
    """Hydra's error in one line: what failed, and its own fix ("To append ... use +key=value")
    or cause where it gives one, else what an override looks like."""
    from hydra.errors import MissingConfigException

    lines = str(error).strip().splitlines() or [type(error).__name__]
    if isinstance(error, MissingConfigException):
        return f"{lines[0]}; a config group's options are the .yaml files in its folder under conf/"
    cause = str(error.__cause__).strip().splitlines()[:1] if error.__cause__ is not None else []
    fix = next((line for line in lines[1:] if line.startswith("To ")), None) or next(iter(cause), None)
    return f"{lines[0].rstrip('.')}; {fix or 'an override is key=value, +key=value to add a key, ~key to remove one'}"


def project_paths(params: dict[str, Any], target: str | None = None) -> ProjectPaths:
    """The layout of every model in params.yaml (the stages that compare them all)."""
    names = list((params.get("models") or {}).keys())
    if not names:
        raise DissectError("params.yaml lists no models; add one with -S '+model@models.NAME=NAME'")
    series = params.get("series") or {}
    return ProjectPaths.in_project([check_name(name) for name in names],
                                   series={check_name(name, "series"): list(versions) for name, versions in series.items()})


if __name__ == "__main__":
    from pipeline.core.errors import run_stage

    run_stage(main, sys.argv[1:])
