"""The aiohttp routes of the HTTP API: ``/v1/chat/completions`` (+ resume, cancel),
``/v1/models``, ``/v1/analyze`` and the ``/chat`` page."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import aiohttp
import structlog
from aiohttp import web

from bridge.http import sse
from bridge.http.chat import ChatRenderer
from bridge.http.errors import ApiError, from_engine
from bridge.http.fetch import fetch_image
from bridge.http.jobs import HttpJob, HttpJobs, JobSubmitter
from bridge.http.parse import ChatRequest, Limits, parse_chat
from bridge.http.resume import KEEPALIVE_S, last_event_id, stream_headers, write_stream
from bridge.hub.auth import TokenGate
from bridge.hub.inflight import InflightBudget
from bridge.jobs.runner import JobRunner
from engine.types import EngineError, JobRequest

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class HttpApiConfig:
    """Limits of the HTTP API.

    Attributes:
        limits: what a chat request may hold (image size, prompt length, image hosts).
        max_body_bytes: largest request body (413 beyond it).
        fetch_timeout_s: time allowed to fetch an ``image_url`` from an allowed host.
        keepalive_s: silence on a stream before an SSE comment line is sent.
    """

    limits: Limits
    max_body_bytes: int
    fetch_timeout_s: float = 10.0
    keepalive_s: float = KEEPALIVE_S


class HttpApi:
    """Serves the HTTP API on the hub's tokens, limits and engine.

    Args:
        cfg: the API's limits.
        gate: checks API keys (the hub's client tokens); ``label_of`` names a token safely.
        submitter: admits jobs (the token's submit rate and the inflight budget).
        budget: the process-wide inflight budget; a request body is reserved in it while read.
        model_ids: the served model ids now (the first is the default).
        ready: whether jobs can be accepted now (the model is loaded, not draining).
        runner: the bridge's job runner (which also counts every job's end in the metrics).
    """

    def __init__(
        self,
        cfg: HttpApiConfig,
        *,
        gate: TokenGate,
        label_of: Callable[[str], str],
        submitter: JobSubmitter,
        budget: InflightBudget,
        model_ids: Callable[[], list[str]],
        ready: Callable[[], bool],
        runner: JobRunner,
    ) -> None:
        self.cfg = cfg
        self._gate = gate
        self._label_of = label_of
        self._budget = budget
        self._model_ids = model_ids
        self._ready = ready
        self.jobs = HttpJobs(submitter, runner)
        self._client: aiohttp.ClientSession | None = None

    def setup(self, app: web.Application) -> None:
        """Add the routes to ``app``."""
        r = app.router
        r.add_post("/v1/chat/completions", self._errors(self.chat))
        r.add_get("/v1/chat/completions/{id}/stream", self._errors(self.resume))
        r.add_delete("/v1/chat/completions/{id}", self._errors(self.cancel))
        r.add_get("/v1/models", self._errors(self.models))
        r.add_get("/v1/models/{id}", self._errors(self.model))
        r.add_post("/v1/analyze", self._errors(self.analyze))
        r.add_get("/chat", self.page)

    async def stop(self, grace_s: float) -> None:
        """Let HTTP jobs finish within ``grace_s``, cancel the rest, close the fetch client."""
        await self.jobs.stop(grace_s)
        if self._client is not None:
            await self._client.close()

    # --- plumbing -----------------------------------------------------------------------------
    def _errors(self, handler: Handler) -> Handler:
        async def route(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except ApiError as exc:
                return exc.response()

        return route

    def _auth(self, request: web.Request) -> str:
        """The token label of the request's Bearer key, or 401."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not self._gate.authenticate(token)[0]:
            log.info("http_unauthorized", remote=request.remote or "?")
            raise ApiError(
                401,
                "missing or invalid API key (Authorization: Bearer <client token>)",
                code="invalid_api_key",
            )
        return self._label_of(token)

    def _check_ready(self) -> None:
        if not self._ready():
            raise ApiError(
                503, "the model is not ready yet; retry later", code="not_ready", retry_after=5.0
            )

    def _model(self, wanted: str | None) -> str:
        ids = self._model_ids()
        if wanted is not None and wanted not in ids:
            raise ApiError(
                404,
                "the model does not exist or is not served here; see GET /v1/models",
                param="model",
                code="model_not_found",
            )
        return wanted or ids[0]

    async def _body(self, request: web.Request) -> bytes:
        """The whole body, reserved in the inflight budget while read (413, 429 busy)."""
        limit = self.cfg.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _too_large(limit)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit) from None

    def _reserve(self, request: web.Request) -> int:
        size = min(request.content_length or 0, self.cfg.max_body_bytes)
        if size and not self._budget.try_reserve(size):
            raise ApiError(
                429,
                "the server holds too many request bodies now; retry soon",
                code="busy",
                retry_after=1.0,
            )
        return size

    async def _image(self, chat: ChatRequest, job_id: str) -> bytes:
        if chat.image is not None:
            return chat.image
        assert chat.image_url is not None
        if self._client is None:
            self._client = aiohttp.ClientSession()
        return await fetch_image(
            self._client,
            chat.image_url,
            max_bytes=self.cfg.limits.max_image_bytes,
            timeout_s=self.cfg.fetch_timeout_s,
            job_id=job_id,
        )

    async def _start(
        self,
        job_id: str,
        label: str,
        origin: str,
        request: JobRequest,
        render: Callable[..., list[str]],
        first: list[str],
        stop_when: Callable[[], bool] | None = None,
    ) -> HttpJob:
        try:
            return await self.jobs.start(job_id, label, origin, request, render, first, stop_when)
        except EngineError as exc:
            log.info("http_job_refused", job_id=job_id, token=label, code=exc.code)
            raise from_engine(exc.code, exc.message, exc.retry_after) from None
        except Exception:
            log.exception("http_submit_failed", job_id=job_id, token=label)
            raise ApiError(500, "the engine failed to accept the job", code="internal") from None

    # --- routes -------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        label = self._auth(request)
        self._check_ready()
        held = self._reserve(request)
        try:
            chat = parse_chat(await self._body(request), self.cfg.limits)
        finally:
            self._budget.release(held)
        model = self._model(chat.model)
        job_id = "chatcmpl-" + secrets.token_hex(12)
        image = await self._image(chat, job_id)
        renderer = ChatRenderer(
            job_id,
            int(time.time()),
            model,
            include_usage=chat.include_usage,
            stop=chat.stop,
            max_tokens=chat.max_tokens,
        )
        job_request = JobRequest(f"http:{job_id}", image, chat.prompt, chat.max_tokens)
        del image
        job = await self._start(
            job_id,
            label,
            "http",
            job_request,
            renderer.feed,
            renderer.first() if chat.stream else [],
            lambda: renderer.stopped,
        )
        if chat.stream:
            return await write_stream(request, job, 0, self.cfg.keepalive_s)
        while not job.ended:
            await job.wait(self.cfg.keepalive_s)
        if renderer.error is not None:
            return renderer.error.response()
        resp = web.json_response(renderer.completion())
        resp.headers["X-Request-Id"] = job_id
        return resp

    async def resume(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/chat/completions/{id}/stream`` with ``Last-Event-ID``."""
        label = self._auth(request)
        job = self._owned(request, label)
        return await write_stream(request, job, last_event_id(request), self.cfg.keepalive_s)

    async def cancel(self, request: web.Request) -> web.Response:
        """``DELETE /v1/chat/completions/{id}``: cancel the job (its stream ends with an error)."""
        label = self._auth(request)
        job = self._owned(request, label)
        self.jobs.cancel(job.id, label)
        return web.json_response(
            {"id": job.id, "object": "chat.completion.deleted", "deleted": True}
        )

    def _owned(self, request: web.Request, label: str) -> HttpJob:
        job = self.jobs.get(request.match_info["id"], label)
        if job is None:
            raise ApiError(
                404,
                "no such request for this API key (it may have expired)",
                param="id",
                code="not_found",
            )
        return job

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``."""
        self._auth(request)
        data = [_model_object(mid) for mid in self._model_ids()]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{id}``: one served model, or 404 ``model_not_found``."""
        self._auth(request)
        mid = self._model(request.match_info["id"])
        return web.json_response(_model_object(mid))

    async def analyze(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/analyze``: multipart ``image`` + ``prompt``, answered with job events."""
        label = self._auth(request)
        self._check_ready()
        held = self._reserve(request)
        try:
            image, prompt, max_tokens = await self._form(request)
        finally:
            self._budget.release(held)
        job_id = "an-" + secrets.token_hex(12)
        job_request = JobRequest(f"http:{job_id}", image, prompt, max_tokens)
        del image
        job = await self._start(
            job_id, label, "http", job_request, lambda event: [sse.job_event(job_id, event)], []
        )
        return await write_stream(request, job, 0, self.cfg.keepalive_s)

    async def _form(self, request: web.Request) -> tuple[bytes, str, int | None]:
        """The ``image``, ``prompt`` and optional ``max_tokens`` of a multipart form."""
        limits = self.cfg.limits
        if not request.content_type.startswith("multipart/form-data"):
            raise ApiError(
                400,
                "send multipart/form-data with 'image' and 'prompt' fields",
                code="invalid_request",
            )
        image: bytes | None = None
        prompt: str | None = None
        max_tokens: int | None = None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, aiohttp.BodyPartReader):
                    raise ApiError(400, "nested multipart is not accepted", code="invalid_request")
                if part.name == "image":
                    image = await _read_part(part, limits.max_image_bytes, "image")
                elif part.name == "prompt":
                    raw = await _read_part(part, limits.max_prompt_chars * 4, "prompt")
                    prompt = raw.decode("utf-8")
                elif part.name == "max_tokens":
                    text = (await _read_part(part, 16, "max_tokens")).decode("ascii")
                    if not text.isdigit() or not 0 < int(text) <= 65_536:
                        raise ApiError(
                            400,
                            "'max_tokens' must be an integer in 1..65536",
                            param="max_tokens",
                            code="invalid_request",
                        )
                    max_tokens = int(text)
                else:
                    await part.release()
        except (ValueError, UnicodeDecodeError, aiohttp.ClientPayloadError):
            raise ApiError(
                400, "the multipart body is malformed or not UTF-8", code="invalid_request"
            ) from None
        if not image:
            raise ApiError(
                400,
                "the form needs a non-empty 'image' file",
                param="image",
                code="invalid_request",
            )
        if prompt is None or len(prompt) > limits.max_prompt_chars:
            raise ApiError(
                400,
                f"the form needs a 'prompt' of at most {limits.max_prompt_chars} characters",
                param="prompt",
                code="invalid_request",
            )
        return image, prompt, max_tokens

    async def page(self, _request: web.Request) -> web.Response:
        """``GET /chat``: the chat page (no framework, no CDN)."""
        html = resources.files("bridge.http").joinpath("static/chat.html").read_text("utf-8")
        return web.Response(
            text=html,
            content_type="text/html",
            headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": "default-src 'self'; "
                "img-src 'self' blob: data:; style-src 'unsafe-inline'; "
                "script-src 'unsafe-inline'",
            },
        )


async def _read_part(part: aiohttp.BodyPartReader, limit: int, name: str) -> bytes:
    body = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"'{name}' exceeds {limit} bytes", param=name, code="too_large")
    return bytes(body)


def _model_object(mid: str) -> dict[str, object]:
    return {"id": mid, "object": "model", "created": 0, "owned_by": "bridge"}


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body exceeds {limit} bytes", code="too_large")


__all__ = ["HttpApi", "HttpApiConfig", "stream_headers"]
