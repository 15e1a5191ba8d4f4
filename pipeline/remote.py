"""`dvc push` and `dvc pull` that end a failure with one line naming the problem and the fix.

    python -m pipeline.remote push [DVC ARGS]   # dvc push --run-cache [DVC ARGS]
    python -m pipeline.remote pull [DVC ARGS]   # dvc pull [DVC ARGS]

DVC does every transfer; this only reads what it said when it failed. DVC's own errors
name a bucket path and a botocore message ("Forbidden", "An error occurred (403) when
calling the HeadObject operation"), and for outputs that were never pushed, the files but
not the stage that makes them. Here each known failure becomes one line on stderr and exit
status 2, like the stages' errors; anything else is passed on as DVC printed it, with its
exit status. Set ``EMBEDDING_DISSECT_DEBUG=1`` to see DVC's own stderr as well. Nothing in
the workspace or the local cache is touched by this module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.errors import DEBUG_ENV, DissectError, run_stage

COMMANDS = {"push": ["push", "--run-cache"], "pull": ["pull"]}
UNREACHABLE = re.compile(r"Could not connect to the endpoint URL|Connect timeout on endpoint|Cannot connect to host")
NO_BUCKET = re.compile(r"NoSuchBucket|specified bucket does not exist")
REFUSED = re.compile(r"SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied|Forbidden|\(403\)|Unable to locate credentials")
NEVER_PUSHED = re.compile(r"Checkout failed for following targets:\n(.*?)\nIs your cache up to date\?", re.S)


def remote_settings(args: list[str]) -> tuple[str, dict]:
    """The name and config of the remote a command uses: ``-r NAME`` or the default one."""
    from dvc.repo import Repo

    with Repo() as repo:
        config = repo.config
        name = next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-r", "--remote")), None)
        name = name or config["core"].get("remote")
        if not name or name not in config["remote"]:
            raise DissectError("no DVC remote is set; add one with `dvc remote add -d storage s3://BUCKET/PREFIX`")
        return name, dict(config["remote"][name])


def stages_of(paths: list[str], lock_file: Path = Path("dvc.lock")) -> list[str]:
    """The stages in dvc.lock whose outputs are, or hold, ``paths``, in dvc.lock's order."""
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) if lock_file.is_file() else {}
    found = []
    for stage, entry in (lock or {}).get("stages", {}).items():
        outs = [out["path"] for out in entry.get("outs", [])]
        if any(path == out or path.startswith(f"{out}/") for path in paths for out in outs):
            found.append(stage)
    return found


def explain(stderr: str, command: str, name: str, remote: dict) -> str | None:
    """One line for a failure DVC described in ``stderr``, or None when it is not a known one."""
    url = remote.get("url", "")
    endpoint = remote.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS S3 endpoint"
    missing = NEVER_PUSHED.search(stderr)
    if missing:
        paths = [line.strip() for line in missing.group(1).splitlines() if line.strip()]
        stages = stages_of(paths)
        made_by = f"`dvc repro {' '.join(stages)}`" if stages else "`dvc repro`"
        return (f"{len(paths)} output(s) of this commit are neither in the local cache nor on remote '{name}' ({url}): "
                f"{', '.join(paths)}; they were never pushed: run {made_by} here to make them, "
                "or `dvc push` from the clone that ran it")
    if NO_BUCKET.search(stderr):
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return (f"bucket '{bucket}' of remote '{name}' ({url}) does not exist at {endpoint}; create it, or point the "
                f"remote at an existing one: `dvc remote modify --local {name} url s3://BUCKET/PREFIX`")
    if REFUSED.search(stderr):
        return (f"remote '{name}' ({url}) refused the credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or AWS_PROFILE), or `dvc remote modify --local {name} access_key_id ...` and `... secret_access_key ...`")
    if UNREACHABLE.search(stderr):
        return (f"remote '{name}' ({url}) cannot be reached at {endpoint}; check that the server is up and the "
                f"endpoint is right: `dvc remote modify --local {name} endpointurl URL`; nothing was {command}ed")
    return None


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        raise DissectError(f"usage: python -m pipeline.remote {{{'|'.join(COMMANDS)}}} [DVC ARGS]")
    command, args = argv[0], argv[1:]
    name, remote = remote_settings(args)
    result = subprocess.run(["dvc", *COMMANDS[command], *args], stdout=None, stderr=subprocess.PIPE, text=True)
    if result.returncode == 0 or os.environ.get(DEBUG_ENV):
        sys.stderr.write(result.stderr)
    if result.returncode == 0:
        return
    line = explain(result.stderr, command, name, remote)
    if line is None:
        if not os.environ.get(DEBUG_ENV):
            sys.stderr.write(result.stderr)
        sys.exit(result.returncode)
    raise DissectError(line)


if __name__ == "__main__":
    run_stage(main)
