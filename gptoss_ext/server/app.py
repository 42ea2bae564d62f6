"""The FastAPI application: routes, API-key check, errors in OpenAI's shape, one log line a request,
and the server's lifetime (the engine thread starts with the app; on shutdown running requests get
--shutdown-timeout seconds to finish, then are cancelled)."""


import asyncio
import contextlib
import hmac
import json
import logging
import time

from .protocol import ApiError, Body
from .responses import ResponseStore
from .runner import EngineDown, EngineRunner

log = logging.getLogger("gptoss_ext.server")


class ServerContext:
    """What every route needs: the engine runner, the model's name and limits, the stored responses."""

    def __init__(self, runner: EngineRunner, model_name: str, max_stored_responses: int = 1024):
        self.runner = runner
        self.model_name = model_name
        self.max_model_len = runner.engine.max_model_len
        self.vocab_size = runner.engine.model.vocab_size
        self.responses = ResponseStore(max_stored_responses)
        self.created = int(time.time())

    def check_model(self, body: Body) -> None:
        name = body.data.get("model")
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {self.model_name!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")

    def submit(self, prompt: list[int], params: list, param: str) -> list:
        """One engine request per SamplingParams; none is left behind when one is refused."""
        handles = []
        try:
            for p in params:
                handles.append(self.runner.submit(prompt, p))
        except ValueError as e:
            for h in handles:
                self.runner.abort(h)
            raise ApiError(400, str(e), param=param, code="invalid_value") from None
        except RuntimeError as e:
            for h in handles:
                self.runner.abort(h)
            raise ApiError(503, str(e), code="engine_down" if isinstance(e, EngineDown) else "shutting_down") from None
        return handles

    def finished(self, rid: str, h, arrival: float, first: float | None, n_out: int, reason: str | None) -> None:
        end = time.perf_counter()
        status = ("error" if reason and reason.startswith("error") else "aborted" if reason == "abort"
                  else "length" if reason == "length" else "completed")
        self.runner.record(h, arrival, first, end, n_out, status)
        ttft = f"{(first - arrival) * 1e3:.0f} ms" if first else "-"
        rate = f"{(n_out - 1) / (end - first):.1f} tok/s" if first and n_out > 1 and end > first else "-"
        log.info("%s in=%d out=%d ttft=%s decode=%s end=%s", rid, len(h.request.prompt), n_out, ttft, rate, reason)

    async def await_or_cancel(self, request, coros, handles):
        """Run a non-streaming request's choices; if the client disconnects first, cancel them (their
        blocks go back at once)."""
        work = asyncio.ensure_future(asyncio.gather(*coros))

        async def watch():
            while not work.done():
                if await request.is_disconnected():
                    for h in handles:
                        self.runner.abort(h)
                    work.cancel()
                    return
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch())
        try:
            return await work
        finally:
            watcher.cancel()
            for h in handles:
                self.runner.abort(h)


class _ApiKey:
    """/v1 only with 'Authorization: Bearer KEY'. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware (`@app.middleware`) passes every streamed chunk through a memory stream and
    an extra task, which under 256 streaming clients cost more than the rest of the server."""

    def __init__(self, app, key: str, refuse):
        self.app, self.want, self.refuse = app, f"Bearer {key}".encode(), refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(got, self.want):
                await self.refuse(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(runner: EngineRunner, model_name: str, *, api_key: str | None = None,
               max_stored_responses: int = 1024, shutdown_timeout: float = 30.0):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import chat, completions, responses

    ctx = ServerContext(runner, model_name, max_stored_responses)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        from .. import tokenizer as tok

        # the vocabulary read now (a second or so), not by the first request; a tokenizer that
        # cannot load says so here, at start
        await asyncio.get_running_loop().run_in_executor(None, tok.get_tokenizer)
        if not runner.alive:
            runner.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, runner.shutdown, shutdown_timeout)

    app = FastAPI(title="gptoss-ext", lifespan=lifespan)
    app.state.ctx = ctx

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error(ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    if api_key:
        app.add_middleware(_ApiKey, key=api_key, refuse=error(ApiError(
            401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' (the server's --api-key)",
            code="invalid_api_key")))

    async def body_of(request: Request) -> Body:
        raw = await request.body()
        try:
            data = json.loads(raw or b"null")
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        return Body(data)

    async def answer(result):
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def _chat(request: Request):
        return await answer(await chat.chat_completions(ctx, await body_of(request), request))

    @app.post("/v1/completions")
    async def _completions(request: Request):
        return await answer(await completions.completions(ctx, await body_of(request), request))

    @app.post("/v1/responses")
    async def _responses(request: Request):
        return await answer(await responses.create_response(ctx, await body_of(request), request))

    @app.get("/v1/responses/{rid}")
    async def _get_response(rid: str):
        got = ctx.responses.get(rid)
        if got is None:
            raise ApiError(404, f"no stored response {rid!r}", param="response_id", code="not_found")
        return got["response"]

    @app.delete("/v1/responses/{rid}")
    async def _delete_response(rid: str):
        if ctx.responses.items.pop(rid, None) is None:
            raise ApiError(404, f"no stored response {rid!r}", param="response_id", code="not_found")
        return {"id": rid, "object": "response.deleted", "deleted": True}

    @app.get("/v1/models")
    async def _models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": ctx.created,
                                            "owned_by": "gptoss-ext", "max_model_len": ctx.max_model_len}]}

    @app.get("/health")
    async def _health():
        if not runner.alive:
            return error(ApiError(503, "the engine thread is not running", code="engine_down"))
        return {"status": "ok", **{k: v for k, v in runner.engine.metrics().items()
                                   if k in ("running", "waiting", "kv_blocks_used", "kv_blocks_total")}}

    @app.get("/metrics")
    async def _metrics():
        return PlainTextResponse(runner.prometheus(model_name), media_type="text/plain; version=0.0.4")

    return app
