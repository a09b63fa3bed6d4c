"""The FastAPI app: OpenAI's image routes over one pipeline, with the batcher in front.

Routes: POST /v1/images/generations, POST /v1/images/edits (img2img / inpainting, multipart),
GET /v1/models, GET /health, GET /metrics, GET / (the web page), GET /v1/images/files/{name}
(images asked for as URLs).

LoRAs are server state: merged at start-up (`dite serve --lora`, or a pipeline loaded with
them) and listed by /v1/models and /health; a request cannot change them (validation.LORA_REFUSAL).
"""

from __future__ import annotations

import asyncio
import os
import base64
import dataclasses
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from dite.engine.errors import DiteError, InputError
from dite.engine.serve.batcher import Batcher, QueueFull
from dite.engine.serve.files import ImageFiles
from dite.engine.serve.metrics import Metrics
from dite.engine.serve.runner import Cancelled, run_batch
from dite.engine.serve.validation import BadRequest, GenerationBody, check_body, error_body, pydantic_error

log = logging.getLogger("dite.serve")
DISCONNECT_POLL_S = 0.1


@dataclasses.dataclass
class ServeOptions:
    """What `dite serve` configures; max_batch 1 turns batching off."""

    max_batch: int = 8
    batch_wait_ms: float = 20.0
    max_queue: int = 64
    timeout_s: float = 120.0
    accel: str | None = None  # the default for requests that name none
    url_ttl_s: float = 600.0


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status_code=status, headers=headers)


def _failure(exc: BaseException) -> JSONResponse:
    """A request's own error, as its response (the others in its batch are unaffected)."""
    if isinstance(exc, InputError):
        return _error(400, str(exc))
    if isinstance(exc, Cancelled):  # not by its client: the server is stopping
        return _error(503, "the server is shutting down; retry elsewhere", kind="server_error")
    if isinstance(exc, DiteError):  # e.g. NonFiniteError: the library's one-line message
        return _error(500, f"generation failed: {exc}", kind="server_error")
    log.error("generation failed", exc_info=exc)
    return _error(500, f"generation failed: {type(exc).__name__} (see the server log)", kind="server_error")


def create_app(pipe, served_name: str, options: ServeOptions | None = None) -> FastAPI:
    """The app over a loaded pipeline; `served_name` is the model id clients see. Long
    because the routes are declared in it: closures over one server's pipeline, batcher,
    metrics and image files (two apps in one process share nothing)."""
    from dite.engine.serve.page import PAGE

    options = options or ServeOptions()
    metrics, files = Metrics(), ImageFiles(options.url_ttl_s)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        # The model fingerprint (accel plans use it) is computed once, here, not in the first
        # request's checks on the event loop.
        await asyncio.to_thread(lambda: pipe.model_id)
        batcher = Batcher(lambda jobs: run_batch(pipe, jobs), metrics, max_batch=options.max_batch,
                          wait_s=options.batch_wait_ms / 1000, max_queue=options.max_queue)
        batcher.start()
        state["batcher"] = batcher
        yield
        await batcher.stop()

    app = FastAPI(title="dite serve", lifespan=lifespan)
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        bad = pydantic_error(list(exc.errors()))
        _count(400, "invalid_request")
        return _error(400, bad.message, bad.param)

    def _count(status: int, error: str | None = None) -> None:
        with metrics.lock:
            metrics.requests.inc(status=str(status))
            if error:
                metrics.errors.inc(kind=error)

    @app.post("/v1/images/generations")
    async def generations(body: GenerationBody, request: Request):
        arrived = time.monotonic()
        try:
            spec = check_body(body, pipe, served_name, options.accel)
        except BadRequest as bad:
            _count(bad.status, "invalid_request")
            return _error(bad.status, bad.message, bad.param, bad.kind)
        return await _serve(spec, request, arrived)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        from dite.engine.serve.edits import read_edit

        arrived = time.monotonic()
        try:
            body, edit = await read_edit(request)
            # decoding and checking the images is not free: off the event loop
            spec = await asyncio.to_thread(check_body, body, pipe, served_name, options.accel, edit)
        except BadRequest as bad:
            _count(bad.status, "invalid_request")
            return _error(bad.status, bad.message, bad.param, bad.kind)
        return await _serve(spec, request, arrived)

    async def _serve(spec, request: Request, arrived: float):
        """Queue a checked request and answer with its images (or its one error)."""
        batcher: Batcher = state["batcher"]
        try:
            job = batcher.submit(spec)
        except QueueFull as full:
            _count(429, "queue_full")
            return _error(429, str(full), kind="rate_limit_error", headers={"Retry-After": str(full.retry_after)})
        try:
            outcome = await _wait(request, batcher, job, arrived + options.timeout_s)
        except asyncio.CancelledError:  # the server stops, or a proxy (Ray Serve's) dropped the request
            batcher.cancel(job, "cancelled")
            raise
        if outcome is None:  # the client left; nobody reads this
            _count(499, "disconnect")
            return Response(status_code=499)
        if outcome == "timeout":
            _count(504, "timeout")
            return _error(504, f"the request took longer than the server's {options.timeout_s:g} s timeout; "
                               "its work was cancelled", kind="timeout_error")
        if isinstance(outcome, BaseException):
            response = _failure(outcome)
            _count(response.status_code, type(outcome).__name__)
            return response
        _count(200)
        with metrics.lock:
            metrics.images.inc(len(outcome.pngs))
            metrics.latency.observe(time.monotonic() - arrived)
        return _body(request, spec, outcome, job, files)

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str):
        png = files.get(name)
        if png is None:
            return _error(404, f"no image {name!r}: image URLs expire {options.url_ttl_s:g} s after they are made")
        return Response(png, media_type="image/png")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": 0,
                                            "owned_by": "dite", "family": pipe.family, "loras": _loras(pipe)}]}

    @app.get("/health")
    async def health():
        batcher = state.get("batcher")
        return {"status": "ok", "model": served_name, "queue": len(batcher.queue) if batcher else 0,
                "loras": _loras(pipe), "pid": os.getpid()}  # which process (Ray replica) answered

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE.replace("{{MODEL}}", served_name).replace("{{FAMILY}}", pipe.family))

    return app


def _loras(pipe) -> list[dict]:
    """The LoRAs merged into the served pipeline: file name, short hash, scale (no folders)."""
    from dite.engine.lora import lora_record

    return lora_record(pipe).get("loras", [])


async def _wait(request: Request, batcher: Batcher, job, deadline: float):
    """The job's outcome; "timeout" past the deadline, None if the client disconnected.
    Either way the job is cancelled (dropped if queued, stopped if its whole batch is)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            batcher.cancel(job, "timeout")
            return "timeout"
        done, _ = await asyncio.wait({job.future}, timeout=min(DISCONNECT_POLL_S, remaining))
        if done:
            try:
                return job.future.result()
            except Cancelled as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - the request's own error, reported to it
                return exc
        if await request.is_disconnected():
            batcher.cancel(job, "disconnect")
            return None


def _body(request: Request, spec, result, job, files: ImageFiles) -> dict:
    data = []
    for png, params in zip(result.pngs, result.parameters):
        item = {"revised_prompt": spec.prompt, "seed": params["seed"]}
        if spec.response_format == "url":
            item["url"] = str(request.url_for("image_file", name=files.put(png)))
        else:
            item["b64_json"] = base64.b64encode(png).decode("ascii")
        data.append(item)
    return {"created": int(time.time()), "data": data, "output_format": "png",
            "dite": {"parameters": result.parameters, "batch_images": result.batch_images,
                     "timings": result.timings,
                     "queue_seconds": round((job.started or job.arrived) - job.arrived, 4)}}
