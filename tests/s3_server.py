"""moto's S3 server on localhost, logging every request with the bytes it sent.

    python tests/s3_server.py PORT LOG

The log (one line a request: method, path, status, body bytes sent) is written by the
server, so what a client downloads is counted on the server's side, not by the client.
Started and stopped by the ``s3_server`` fixture in tests/remote_servers.py, and by
benchmarks/remote.py.
"""

from __future__ import annotations

import sys
import threading


PIECE = 1 << 20  # bytes written at a time, so an answer the client abandons is counted as far as it went


def counting(app, log_path: str):
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1, encoding="utf-8")

    def wrapped(environ, start_response):
        status_holder = {}

        def record_start(status, headers, exc_info=None):
            status_holder["status"] = status.split(" ", 1)[0]
            return start_response(status, headers, exc_info)

        body = app(environ, record_start)
        sent = 0
        try:
            for chunk in body:
                view = memoryview(chunk)
                for start in range(0, len(view), PIECE):
                    piece = view[start : start + PIECE]
                    yield bytes(piece)
                    sent += len(piece)  # counted once written: a client that hangs up stops the count
        finally:
            if hasattr(body, "close"):
                body.close()
            with lock:
                log.write(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')} {status_holder.get('status', '-')} {sent}\n")

    return wrapped


def main(port: int, log_path: str) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = counting(DomainDispatcherApplication(create_backend_app), log_path)
    server = make_server("127.0.0.1", port, app, threaded=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
