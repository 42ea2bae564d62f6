"""An OpenAI-compatible HTTP server on the serving engine (`python -m gptoss_ext serve`).

  protocol     the error shape, ids, reading a request body field by field, stop strings
  runner       the thread that steps the engine; the counters and histograms of /metrics
  chat         POST /v1/chat/completions (harmony in and out, tool calls, reasoning_content)
  responses    POST /v1/responses (items, previous_response_id, the documented stream events)
  completions  POST /v1/completions (raw text or token ids)
  app          the FastAPI app: routes, API key, errors, logging, lifetime

    from gptoss_ext.server import make_server
    server = make_server(model, port=8000)          # uvicorn.Server; server.run() blocks
"""

from __future__ import annotations

import importlib
import threading
import time

from .app import ServerContext, create_app
from .protocol import ApiError
from .runner import EngineRunner

__all__ = ["ApiError", "EngineRunner", "ServerContext", "ServerThread", "create_app", "make_server"]


def _needs_fastapi():
    try:
        for name in ("fastapi", "uvicorn"):
            importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"the server needs fastapi and uvicorn ({e.name} is missing): "
                          "pip install 'gptoss-ext[serve]'") from None


def make_server(model, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "gpt-oss",
                api_key: str | None = None, engine=None, max_stored_responses: int = 1024,
                shutdown_timeout: float = 30.0, log_level: str = "info", **engine_args):
    """A uvicorn.Server serving `model` through a new Engine(model, **engine_args) (or `engine`)."""
    _needs_fastapi()
    import uvicorn

    from ..engine import Engine

    engine = engine or Engine(model, **engine_args)
    app = create_app(EngineRunner(engine), model_name, api_key=api_key, max_stored_responses=max_stored_responses,
                     shutdown_timeout=shutdown_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            access_log=False)
    return uvicorn.Server(config)


class ServerThread:
    """A server in a background thread of this process (tests, examples, notebooks):

        with ServerThread(make_server(model, port=0)) as url:    # url = "http://127.0.0.1:PORT/v1"
            ...
    """

    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=server.run, name="gptoss-server", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 60:
                raise RuntimeError("the server did not start (see its log)")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/v1"

    @property
    def app(self):
        return self.server.config.app

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
