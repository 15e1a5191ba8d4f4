"""moto's S3 (and IAM) server on localhost for the DVC remote tests, counting bytes per request.

    python tests/moto_s3.py PORT LOG PAUSE

One line a request goes to LOG: method, path, status, bytes received, bytes sent, so what
a `dvc push` or `dvc pull` moved is counted on the server's side. While the file PAUSE
holds a number, each request for a cached object (a path with ``/files/md5/``) waits that
many seconds before it is answered: a test can then stop a push or a pull half-way at a
point it chose, instead of racing a fast localhost transfer. Started and stopped by the
fixtures in tests/test_dvc_remote.py and by benchmarks/remote_dvc.py; prints ``ready``
once it listens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Requests moto answers without checking credentials: creating the team's user, its policy
# and its access key. Every request after them must be signed with that key.
SETUP_REQUESTS = 3
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def counted(app, log_path: str, pause_path: str):
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the server's life
    pause_file = Path(pause_path)

    def wrapped(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if "/files/md5/" in path:
            try:
                time.sleep(float(pause_file.read_text() or 0))
            except (FileNotFoundError, ValueError):
                pass
        received = int(environ.get("CONTENT_LENGTH") or 0)
        status: dict[str, str] = {}

        def record_start(line, headers, exc_info=None):
            status["code"] = line.split(" ", 1)[0]
            return start_response(line, headers, exc_info)

        body = app(environ, record_start)
        sent = 0
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            with lock:
                log.write(f"{environ['REQUEST_METHOD']} {path} {status.get('code', '-')} {received} {sent}\n")

    return wrapped


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    """A running server: its endpoint, the access key moto issued, the request log."""

    process: subprocess.Popen
    endpoint: str
    key_id: str
    secret: str
    log: Path
    pause: Path

    @property
    def credentials(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def requests(self) -> list[tuple[str, str, str, int, int]]:
        """(method, path, status, bytes received, bytes sent) of every request so far."""
        rows = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            method, path, status, received, sent = line.split(" ")
            rows.append((method, path, status, int(received), int(sent)))
        return rows

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def start(folder: Path, buckets: tuple[str, ...] = ("team",)) -> S3Server:
    """Start the server on a free port, create a user with an access key, and the buckets."""
    import boto3

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log, pause = folder / "requests.log", folder / "pause"
    process = subprocess.Popen(
        [sys.executable, __file__, str(port), str(log), str(pause)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)},
        stdout=subprocess.PIPE, stderr=open(folder / "server.err", "w"), text=True,  # noqa: SIM115
    )
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError(f"moto's S3 server did not start: {(folder / 'server.err').read_text()}")
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="team")
    iam.put_user_policy(UserName="team", PolicyName="all", PolicyDocument=ALLOW_ALL)
    key = iam.create_access_key(UserName="team")["AccessKey"]
    server = S3Server(process, endpoint, key["AccessKeyId"], key["SecretAccessKey"], log, pause)
    for bucket in buckets:
        server.client().create_bucket(Bucket=bucket)
    return server


def main(port: int, log_path: str, pause_path: str) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = counted(DomainDispatcherApplication(create_backend_app), log_path, pause_path)
    server = make_server("127.0.0.1", port, app, threaded=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
