"""`kninfer serve`: bundles behind an OpenAI-compatible HTTP API (the `serve` extra: FastAPI and uvicorn)."""

from __future__ import annotations

from typing import Annotated

import typer

from kninfer.cli.run import LowMemoryOption, ThreadsOption
from kninfer.errors import KninferError


def serve(
    bundles: Annotated[list[str], typer.Argument(help="Bundles to serve (a folder or .onnx file each), each a "
                                                      "model named by its folder; NAME=PATH names it NAME.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one, printed).", min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="KNINFER_API_KEY", show_default=False,
                                                help="Require 'Authorization: Bearer KEY' on /v1 (default: "
                                                     "$KNINFER_API_KEY; none: open).")] = None,
    max_concurrency: Annotated[int, typer.Option(help="Requests decoded at once (each in a thread, on the shared "
                                                      "onnxruntime sessions).", min=1)] = 4,
    max_queue: Annotated[int, typer.Option(help="Requests that wait for a slot; past them a request gets 429.",
                                           min=0)] = 32,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take, queue included (then 504, or an "
                                                "error event in a stream).", min=1)] = 300.0,
    grace: Annotated[float, typer.Option(help="On SIGTERM or Ctrl-C: seconds running requests get to finish "
                                              "before they are cut (new ones get 503).", min=0)] = 10.0,
    threads: ThreadsOption = None,
    low_memory: LowMemoryOption = False,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level: critical, error, warning, info (one line "
                                                "per request) or debug.")] = "info",
) -> None:
    """Serve bundles over HTTP as OpenAI's API does: POST /v1/completions and /v1/chat/completions (JSON or
    server-sent events), GET /v1/models and /health, and for classifier bundles POST /v1/classify."""
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise KninferError(f"--log-level is {log_level!r}: expected critical, error, warning, info or debug")
    try:
        from kninfer import serve as http
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in ("fastapi", "starlette", "uvicorn", "pydantic", "anyio"):
            raise
        raise KninferError("'kninfer serve' needs the serve extra: pip install 'kninfer[serve]'") from None
    models = http.load_models(bundles, threads=threads, low_memory=low_memory)
    server = http.build_server(models, host, port, max_concurrency=max_concurrency, max_queue=max_queue,
                               timeout=timeout, grace=grace, api_key=api_key, log_level=log_level)
    http.serve(server)


COMMANDS = [serve]
