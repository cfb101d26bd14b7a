"""`genpipe serve MODEL@ALIAS`: MLflow's scoring server for a registered generator, with limits.

MLflow's own app (`mlflow.pyfunc.scoring_server.init`: /ping, /health, /version, /invocations and
its request formats) runs in this process under uvicorn, so nothing is looked up on PATH (`mlflow
models serve` execs `uvicorn` by name). One ASGI layer in front of /invocations
- refuses a body over `max_bytes` with 413 as soon as it knows (Content-Length, or counting), and
  one that does not arrive within `read_seconds` with 408;
- refuses Parquet bodies (415): a small one may decompress to a table of any size;
- lets `concurrency` requests work at once; another waits up to `queue_seconds`, then gets 503;
- trims every error to a one-line JSON `{"error_code", "message"}` (no stack trace, no echo of the
  request: MLflow quotes a bad JSON body back whole).
The model stops a request's sampling at its next network forward once `timeout` seconds have passed
(GENPIPE_REQUEST_TIMEOUT, `components/registry/deadline.py`): 504 with one line, the thread free
again. SIGTERM or SIGINT: stop accepting, stop every sampling in flight the same way, exit.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULTS = {"timeout": 30.0, "max_bytes": 1 << 20, "concurrency": 2, "queue_seconds": 5.0}
PARQUET = b"application/vnd.apache.parquet"  # refused: a small body may decompress to a huge table
READ_SECONDS = 10.0  # the whole body must arrive within this
GRACE_SECONDS = 3.0  # on SIGTERM, how long answers in flight may take before their tasks are cancelled
MESSAGE_CHARS = 500  # an error message is cut to one line of at most this many characters
CODES = {400: "BAD_REQUEST", 408: "BAD_REQUEST", 413: "BAD_REQUEST", 415: "BAD_REQUEST"}
CODES.update({503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"})


def one_line(status: int, body: bytes) -> bytes:
    """An error body as `{"error_code", "message"}` with the message's first line, cut short."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    code = CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR")
    text = body.decode("utf-8", "replace")
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):  # MLflow's errors
        code, text = str(parsed.get("error_code") or code), parsed["message"]
    elif isinstance(parsed, dict) and isinstance(parsed.get("detail"), str):  # FastAPI's (405, ...)
        text = parsed["detail"]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    message = lines[0] if lines else f"HTTP {status}"
    if len(message) > MESSAGE_CHARS:
        message = message[: MESSAGE_CHARS - 3] + "..."
    return json.dumps({"error_code": code, "message": message}).encode()


class Limits:
    """ASGI middleware: body size and read time, concurrency, one-line errors on /invocations."""

    def __init__(self, app, *, max_bytes: int, concurrency: int, queue_seconds: float) -> None:
        self.app, self.max_bytes, self.queue_seconds = app, max_bytes, queue_seconds
        self.slots = asyncio.Semaphore(concurrency)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").lower().startswith(PARQUET):
            return await self._refuse(
                send, 415, "send application/json or text/csv (parquet may unpack to any size)"
            )
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, 413, self._too_large())
        try:
            body = await asyncio.wait_for(self._read(receive), READ_SECONDS)
        except TimeoutError:
            return await self._refuse(send, 408, f"the request body did not arrive in {READ_SECONDS:g} s")
        if body is None:
            return await self._refuse(send, 413, self._too_large())
        try:
            await asyncio.wait_for(self.slots.acquire(), self.queue_seconds)
        except TimeoutError:
            return await self._refuse(send, 503, "server busy: every slot is sampling; retry later")
        try:
            await self.app(scope, self._replay(body), self._trimmed(send))
        finally:
            self.slots.release()

    def _too_large(self) -> str:
        return f"request body over {self.max_bytes} bytes (genpipe serve --max-bytes): send fewer rows"

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None as soon as it passes max_bytes."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes):
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await asyncio.Event().wait()  # as a live connection would: nothing more, ever
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return receive

    @staticmethod
    def _trimmed(send):
        """`send` that rewrites an error response (status >= 400) to one line."""
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start.update(message)
                return
            if not start or message["type"] != "http.response.body":
                return await send(message)
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                await Limits._send(send, start["status"], one_line(start["status"], b"".join(parts)))

        return wrapped

    @staticmethod
    async def _send(send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = json.dumps({"error_code": CODES.get(status, "BAD_REQUEST"), "message": message}).encode()
        await Limits._send(send, status, body)


def check_limits(*, timeout: float, max_bytes: int, concurrency: int, queue_seconds: float) -> None:
    """One line naming the option when a limit is out of range."""
    if not (math.isfinite(timeout) and 0 < timeout <= 3600):
        raise ValueError(f"--timeout {timeout} must lie in (0, 3600] seconds")
    if not 1 <= max_bytes <= 1 << 30:
        raise ValueError(f"--max-bytes {max_bytes} must lie in [1, 2**30]")
    if not 1 <= concurrency <= 32:
        raise ValueError(f"--concurrency {concurrency} must lie in [1, 32]")
    if not (math.isfinite(queue_seconds) and 0 <= queue_seconds <= 3600):
        raise ValueError(f"--queue-seconds {queue_seconds} must lie in [0, 3600]")


def check_port(host: str, port: int) -> None:
    """One line when `host:port` cannot be listened on (uvicorn would say so only after the load)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} must lie in [0, 65535]")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(*, params: Path, target: str, host: str, port: int, **limits: Any) -> None:
    """Load `target` from the registry and answer HTTP requests until SIGTERM/SIGINT."""
    import uvicorn

    from components.registry.deadline import TIMEOUT_ENV, request_timeout
    from components.registry.registry import load_pyfunc
    from pipelines.lineage import repo_root
    from pipelines.promote import store_uri
    from pipelines.sample import CACHE, parse_target

    defaults = {**DEFAULTS, "timeout": request_timeout() or DEFAULTS["timeout"]}  # GENPIPE_REQUEST_TIMEOUT
    limits = {**defaults, **{k: v for k, v in limits.items() if v is not None}}
    check_limits(**limits)
    check_port(host, port)  # before the load: a port in use is one line at once
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import pandas as pd
    from mlflow.pyfunc import scoring_server

    uri = store_uri(params)
    name, alias, version = parse_target(target)
    os.environ.pop(TIMEOUT_ENV, None)  # no deadline for the warm-up below
    model, mv = load_pyfunc(
        tracking_uri=uri, name=name, alias=alias, version=version, cache=repo_root() / CACHE
    )
    # One image with the trained defaults before /ping answers: the first request then pays for
    # neither the samplers' lazy imports nor torch's first calls, and a broken model never serves.
    model.predict(pd.DataFrame({"seed": [0]}))
    os.environ[TIMEOUT_ENV] = f"{limits['timeout']:g}"  # the model's deadline (read per request)
    # MLflow's own 504 only as a backstop: parsing and PNG encoding come on top of the sampling.
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = f"{limits['timeout'] + 10:g}"
    python_model = model.unwrap_python_model()
    app = Limits(
        scoring_server.init(model),
        max_bytes=limits["max_bytes"],
        concurrency=limits["concurrency"],
        queue_seconds=limits["queue_seconds"],
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if hasattr(python_model, "stop"):  # a version logged before the deadline has no stop
                python_model.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=GRACE_SECONDS, log_level="warning"
    )
    where = f"{name} v{mv.version}" + (f" ({alias})" if alias else "")
    print(
        f"serving {where} on http://{host}:{port} (POST /invocations, GET /ping): timeout "
        f"{limits['timeout']:g} s, body <= {limits['max_bytes']} bytes, {limits['concurrency']} at a time",
        flush=True,
    )
    Server(config).run()


def command(
    target: Annotated[
        str, typer.Argument(metavar="MODEL@ALIAS", help="e.g. genpipe-diffusion@champion, diffusion_pixel@v3")
    ],
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p")] = 5001,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", help="seconds of sampling per request (default: GENPIPE_REQUEST_TIMEOUT, else 30)"
        ),
    ] = None,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", help="largest request body (default 1 MiB)")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", help="requests sampling at once (default 2)")
    ] = None,
    queue_seconds: Annotated[
        float | None, typer.Option("--queue-seconds", help="wait for a free slot, then 503 (default 5)")
    ] = None,
    params: Annotated[Path, typer.Option("--params", help="params file (default: ./params.yaml)")] = Path(
        "params.yaml"
    ),
) -> None:
    """Serve a registered generator over HTTP (MLflow's scoring server) with request limits."""
    from pipelines.runtime import fail

    try:
        serve(
            params=params, target=target, host=host, port=port, timeout=timeout,
            max_bytes=max_bytes, concurrency=concurrency, queue_seconds=queue_seconds,
        )  # fmt: skip
    except (ValueError, OSError, LookupError, RuntimeError) as err:
        if os.environ.get("GENPIPE_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"serve: {message}")
