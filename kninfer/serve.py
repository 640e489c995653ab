"""`kninfer serve`: bundles behind an OpenAI-compatible HTTP API, on FastAPI and uvicorn (the `serve` extra).

POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with `stream`), GET /v1/models and
/health, and for classifier bundles POST /v1/classify. Decoding runs in worker threads on the runtime's shared
onnxruntime sessions, one request per thread: at most `max_concurrency` at once, `max_queue` more wait for a slot,
past that a request is refused (429). Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from kninfer.errors import KninferError
from kninfer.runtime import LanguageModel, TextClassifier, load
from kninfer.runtime.classify import Prediction, encode_inputs
from kninfer.runtime.generate import Sampling, TextStream, decoding
from kninfer.runtime.tokenizer import decode, encode

Model = LanguageModel | TextClassifier
Text = Annotated[str, Field(min_length=1)]
_UNION_TAG = re.compile(r"str$|list\[|constrained-|function-")  # pydantic's names of a union's members in `loc`
# OpenAI fields this server does not implement, with the value that asks for nothing (sent as that: accepted)
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": False, "top_logprobs": 0, "suffix": None,
               "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0, "tools": None, "functions": None,
               "response_format": None}


class ApiError(Exception):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict[str, Any]:
        """{"error": {...}} as OpenAI sends it."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Strict JSON types (no "16" for 16); fields OpenAI has and this server ignores are let through."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str


class StreamOptions(BaseModel):
    """OpenAI's stream_options: include_usage adds a last chunk with the usage of all choices."""

    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Sampled(_Request):
    """The fields completions and chat share: how many tokens, how to sample, where to stop, whether to stream."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default and range; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's: kninfer's (and vLLM's) extra
    repetition_penalty: float = Field(1.0, gt=0)  # likewise
    seed: int | None = Field(None, ge=0)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampled):
    """POST /v1/completions: a prompt, or a list of prompts (a choice each)."""

    prompt: str | Annotated[list[str], Field(min_length=1)]


class TextPart(BaseModel):
    """A message's content part; only text ones."""

    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message of the conversation: its role and its text (a string or text parts)."""

    model_config = ConfigDict(strict=True, extra="allow")  # `name` and the like are ignored
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        """The message as the chat template reads it, text parts joined."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Sampled):
    """POST /v1/chat/completions: the conversation so far."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)  # chat's newer name for max_tokens


class ClassifyRequest(_Request):
    """POST /v1/classify (kninfer's own): texts to label, and with a pair task the second sentence of each."""

    input: Text | Annotated[list[Text], Field(min_length=1)]
    pairs: Text | Annotated[list[Text], Field(min_length=1)] | None = None


@dataclass
class Job:
    """One prompt to continue and how to sample."""

    prompt: str
    special_tokens: bool  # False for a rendered chat template, which writes its own
    sampling: Sampling

    def stream(self, lm: LanguageModel) -> TextStream:
        """The continuation in pieces, as `LanguageModel.stream` gives them."""
        return TextStream(decoding(lm.session, lm.tokenizer, [self.prompt], self.sampling,
                                   special_tokens=self.special_tokens), self.sampling.stop)


@dataclass
class Finished:
    """A job's whole text, why it ended and its token counts."""

    text: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_tokens or the context
    prompt_tokens: int
    completion_tokens: int


class Lease:
    """A running slot; `release` frees it (once, however often called)."""

    def __init__(self, slots: Slots) -> None:
        self._slots: Slots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.running -= 1
            self._slots.semaphore.release()
            self._slots = None


class Slots:
    """At most `concurrency` requests run; up to `queue` more wait for a slot (first come, first served); the rest
    are refused. `drain` starts a shutdown: new requests are refused, running ones are cut at its deadline."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency, self.queue = concurrency, queue
        self.semaphore = anyio.Semaphore(concurrency)
        self.running = self.waiting = 0
        self.closing_at: float | None = None

    async def take(self, deadline: float) -> Lease:
        """A slot, after waiting in the queue at most until `deadline` (time.monotonic())."""
        if self.closing_at is not None:
            raise _shutting_down()
        if self.running + self.waiting >= self.concurrency + self.queue:
            raise ApiError(429, f"the server is busy: {self.running} requests running and {self.waiting} waiting "
                                "(its --max-concurrency and --max-queue); retry later", "rate_limit_error",
                           code="queue_full")
        self.waiting += 1
        try:
            with anyio.move_on_after(deadline - time.monotonic()) as waited:
                await self.semaphore.acquire()
        finally:
            self.waiting -= 1
        if waited.cancelled_caught:
            raise ApiError(504, "no slot came free before the request's timeout (--timeout)", "timeout_error",
                           code="timeout")
        self.running += 1
        lease = Lease(self)
        if self.closing_at is not None:  # the shutdown began while it waited
            lease.release()
            raise _shutting_down()
        return lease

    def check(self, deadline: float) -> None:
        """Raise when the server's shutdown grace time is over, or the request is past its deadline."""
        now = time.monotonic()
        if self.closing_at is not None and now >= self.closing_at:
            raise _shutting_down()
        if now >= deadline:
            raise ApiError(504, "the request took longer than the server's --timeout", "timeout_error",
                           code="timeout")

    def drain(self, grace: float) -> None:
        """Refuse new requests from now on and cut running ones `grace` seconds from now."""
        if self.closing_at is None:
            self.closing_at = time.monotonic() + grace


class Service:
    """The models and what the endpoints share: slots, the decoding threads, the timeout, the API key."""

    def __init__(self, models: dict[str, Model], max_concurrency: int = 4, max_queue: int = 32,
                 timeout: float = 300.0, api_key: str | None = None) -> None:
        self.models, self.timeout, self.api_key = models, timeout, api_key
        self.slots = Slots(max_concurrency, max_queue)
        self.threads = anyio.CapacityLimiter(max_concurrency)
        self.created = int(time.time())

    def authorize(self, request: Request) -> None:
        """With an API key set, the request must carry `Authorization: Bearer KEY` (compared in constant time)."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "no or a wrong API key: send 'Authorization: Bearer KEY' with the server's "
                                "--api-key", code="invalid_api_key")

    def model(self, name: str, task: str, endpoint: str) -> Any:
        """The model named `name`, which must be a `task` bundle."""
        model = self.models.get(name)
        if model is None:
            raise ApiError(404, f"the model '{name}' does not exist; this server has {', '.join(self.models)}",
                           param="model", code="model_not_found")
        if model.info.task != task:
            raise ApiError(400, f"the model '{name}' is a {model.info.task} bundle: {endpoint} needs a {task} one",
                           param="model", code="wrong_model_task")
        return model

    async def generate(self, request: Request, body: CompletionRequest | ChatRequest) -> Any:
        """A completion or chat completion, as one JSON response or as server-sent events."""
        deadline = time.monotonic() + self.timeout
        chat = isinstance(body, ChatRequest)
        lm = self.model(body.model, "causal-lm", "/v1/chat/completions" if chat else "/v1/completions")
        _refuse_unsupported(body)
        jobs = await anyio.to_thread.run_sync(chat_jobs if chat else completion_jobs, lm, body)
        api = Api(body.model, chat)
        lease = await self.slots.take(deadline)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return LeasedStream(self._events(api, lm, jobs, deadline, usage), lease)
        try:
            done = []
            for job in jobs:
                async for item in self._decode(lm, job, deadline):
                    if isinstance(item, Finished):
                        done.append(item)
                    elif await request.is_disconnected():
                        raise ApiError(499, "the client closed the request", code="client_closed")
        finally:
            lease.release()
        return api.response(done)

    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        """Labels and scores of the inputs (or input pairs)."""
        deadline = time.monotonic() + self.timeout
        classifier: TextClassifier = self.model(body.model, "sequence-classification", "/v1/classify")
        texts = [body.input] if isinstance(body.input, str) else body.input
        pairs = [body.pairs] if isinstance(body.pairs, str) else body.pairs
        if pairs is not None and len(pairs) != len(texts):
            raise ApiError(400, f"{len(pairs)} pairs for {len(texts)} inputs: give one pair per input", param="pairs")
        lease = await self.slots.take(deadline)
        try:
            found, tokens = await anyio.to_thread.run_sync(_classify, classifier, texts, pairs, limiter=self.threads)
        finally:
            lease.release()
        return {"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"index": i, "label": p.label, "score": p.score} for i, p in enumerate(found)]}

    async def _decode(self, lm: LanguageModel, job: Job, deadline: float) -> AsyncIterator[str | Finished]:
        """The job's text pieces as they are decoded (each in a worker thread), then its Finished."""
        try:  # the request was checked: a KninferError now is onnxruntime failing, not the request's fault
            stream = await anyio.to_thread.run_sync(job.stream, lm, limiter=self.threads)
            while True:
                self.slots.check(deadline)
                piece = await anyio.to_thread.run_sync(next, stream, None, limiter=self.threads)
                if piece is None:
                    break
                yield piece
        except KninferError as error:
            raise ApiError(500, str(error), "server_error") from None
        result = stream.result
        ids = result.token_ids[0]
        cut = result.texts[0] != decode(lm.tokenizer, ids)  # a stop string cut the text
        room = min(job.sampling.max_new_tokens, lm.info.context_length - result.prompt_tokens)
        yield Finished(result.texts[0], "stop" if cut or len(ids) < room else "length", result.prompt_tokens,
                       len(ids))

    async def _events(self, api: Api, lm: LanguageModel, jobs: list[Job], deadline: float,
                      include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece, a last one per choice with its finish_reason and usage, OpenAI's
        usage chunk when asked for, then [DONE]; an error past the first byte comes as an error event."""
        try:
            done = []
            for index, job in enumerate(jobs):
                if api.chat:
                    yield _event(api.chunk(index, {"role": "assistant", "content": ""}))
                async for item in self._decode(lm, job, deadline):
                    if isinstance(item, Finished):
                        done.append(item)
                        yield _event(api.chunk(index, {} if api.chat else "", item.finish_reason, [item]))
                    else:
                        yield _event(api.chunk(index, {"content": item} if api.chat else item))
            if include_usage:
                yield _event({**api.chunk(0, ""), "choices": [], "usage": _usage(done)})
        except ApiError as error:
            yield _event(error.body())
        yield "data: [DONE]\n\n"


@dataclass
class Api:
    """The response shapes of /v1/completions (`chat` False) or /v1/chat/completions."""

    model: str
    chat: bool
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()), init=False)

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def chunk(self, index: int, delta: dict[str, str] | str, finish_reason: str | None = None,
              done: list[Finished] | None = None) -> dict[str, Any]:
        """A stream chunk of one choice: `delta` its new text (a dict for chat); the last one carries usage."""
        content = {"delta": delta} if self.chat else {"text": delta}
        chunk = self._head("chat.completion.chunk" if self.chat else "text_completion")
        chunk["choices"] = [{"index": index, **content, "logprobs": None, "finish_reason": finish_reason}]
        return chunk | ({"usage": _usage(done)} if done else {})

    def response(self, done: list[Finished]) -> dict[str, Any]:
        """The non-streaming response: a choice per job, and usage."""
        response = self._head("chat.completion" if self.chat else "text_completion")
        response["choices"] = [
            {"index": i, **({"message": {"role": "assistant", "content": f.text}} if self.chat else {"text": f.text}),
             "logprobs": None, "finish_reason": f.finish_reason} for i, f in enumerate(done)]
        return response | {"usage": _usage(done)}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


class LeasedStream(StreamingResponse):
    """Server-sent events that free their slot however the response ends: done, cancelled by a client that left
    (starlette cancels it at once), or never started."""

    def __init__(self, events: AsyncIterator[str], lease: Lease) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.release()
            await self.body_iterator.aclose()  # its decoding and KV cache go now, not when collected


def _classify(classifier: TextClassifier, texts: list[str],
              pairs: list[str] | None) -> tuple[list[Prediction], int]:
    """The predictions, and the tokens they read (as the classifier encodes them)."""
    inputs = [(text,) for text in texts] if pairs is None else list(zip(texts, pairs, strict=True))
    ids = encode_inputs(classifier.tokenizer, inputs, classifier.info.max_input_length)
    return classifier.classify(texts, pairs), sum(len(i) for i in ids)


def completion_jobs(lm: LanguageModel, body: CompletionRequest) -> list[Job]:
    """A job per prompt (a prompt gets the tokenizer's special tokens, as `LanguageModel.stream`)."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return [_job(lm, body, p, len(encode(lm.tokenizer, p)) if p else 0, True, 16) for p in prompts]


def chat_jobs(lm: LanguageModel, body: ChatRequest) -> list[Job]:
    """The conversation rendered with the bundle's chat template, whole (none of it is dropped)."""
    if lm.info.meta.get("chat_template") is None:
        raise ApiError(400, f"the model '{body.model}' has no chat template: use /v1/completions", param="model",
                       code="no_chat_template")
    prompt = lm.chat_template.render([message.as_dict() for message in body.messages])
    return [_job(lm, body, prompt, len(encode(lm.tokenizer, prompt, special_tokens=False)), False, None)]


def _job(lm: LanguageModel, body: CompletionRequest | ChatRequest, prompt: str, tokens: int, special_tokens: bool,
         default_max: int | None) -> Job:
    """A job, refused when the prompt is empty or does not leave room in the context for max_tokens (default:
    `default_max` or the rest of the context)."""
    context, param = lm.info.context_length, "messages" if isinstance(body, ChatRequest) else "prompt"
    if not prompt or not tokens:
        raise ApiError(400, "the prompt is empty: expected some text to continue", param=param)
    room = context - tokens
    if room < 1:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but the prompt has {tokens} "
                            "tokens: shorten it", param=param, code="context_length_exceeded")
    wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if wanted is not None and wanted > room:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but {tokens + wanted} were "
                            f"requested ({tokens} in the prompt, {wanted} for the completion): shorten the prompt "
                            "or lower max_tokens", param="max_tokens", code="context_length_exceeded")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = Sampling(max_new_tokens=wanted or min(default_max or room, room), temperature=body.temperature,
                        top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                        seed=body.seed, stop=stop)
    return Job(prompt, special_tokens, sampling)


def _refuse_unsupported(body: BaseModel) -> None:
    """400 for an OpenAI field this server would otherwise ignore, set to ask for something (n=2, logprobs...)."""
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value not in (None, UNSUPPORTED[name], [], {}):
            raise ApiError(400, f"{name}={json.dumps(value)[:40]} is not supported by kninfer serve",
                           param=name, code="unsupported_parameter")


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", "server_error", code="shutting_down")


def _usage(done: list[Finished]) -> dict[str, int]:
    prompt, completion = sum(f.prompt_tokens for f in done), sum(f.completion_tokens for f in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over `service`: the /v1 routes (behind the API key, if any) and /health."""
    app = FastAPI(title="kninfer serve", version="1", strict_content_type=False)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(service.authorize)])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """OpenAI's completions: continue `prompt` (a string or a list of them, each a choice)."""
        return await service.generate(request, body)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """OpenAI's chat completions: the reply to `messages`, rendered with the bundle's chat template."""
        return await service.generate(request, body)

    @v1.post("/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        """Not OpenAI's: label `input` (a text or a list of them; `pairs` the second sentence of each) with a
        classifier bundle. Answers {"object": "list", "data": [{"index", "label", "score"}], "usage"}."""
        return await service.classify(body)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        """One entry per bundle, named by its folder (or NAME=PATH)."""
        data = [{"id": name, "object": "model", "created": service.created, "owned_by": "kninfer",
                 "task": m.info.task, "context_length": m.info.context_length} for name, m in service.models.items()]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while serving, 503 once shutting down; the slots in use."""
        slots = service.slots
        status = "shutting_down" if slots.closing_at is not None else "ok"
        return JSONResponse({"status": status, "models": list(service.models), "running": slots.running,
                             "waiting": slots.waiting}, 503 if slots.closing_at is not None else 200)

    app.include_router(v1)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(KninferError, _kninfer_error)
    return app


def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), error.status)


def _kninfer_error(request: Request, error: KninferError) -> JSONResponse:
    """The runtime's refusal of a request's input (a chat template that fails on the messages, say): 400."""
    return _api_error(request, ApiError(400, str(error)))


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """A bad or missing field: 400 naming it (its path in the body) and what was expected. Of a union's errors (a
    string or a list of them) the deepest is the one about what was sent."""
    found = max(error.errors(), key=lambda e: len(e["loc"]))
    path = [str(part) for part in found["loc"][1:] if not _UNION_TAG.match(str(part))]
    param = ".".join(path) or None
    message = f"{param}: {found['msg']}" if param else f"the request body (a JSON object): {found['msg']}"
    return _api_error(request, ApiError(400, message, param=param))


def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, a body that is not JSON or not UTF-8) in OpenAI's shape."""
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return _api_error(request, ApiError(error.status_code, str(error.detail), kind))


class Server(uvicorn.Server):
    """uvicorn's server, printing the URL and the models once it listens; SIGTERM or Ctrl-C drains the slots: new
    requests get 503, running ones finish or are cut after `grace` seconds (a stream ends with an error event)."""

    def __init__(self, config: uvicorn.Config, service: Service, grace: float) -> None:
        super().__init__(config)
        self.service, self.grace = service, grace

    @property
    def url(self) -> str:
        """http://HOST:PORT of the listening socket (the port chosen when given 0)."""
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            key = ", API key required" if self.service.api_key is not None else ""
            lines = [f"kninfer serve: {self.url}/v1 (Ctrl-C or SIGTERM stops it{key})"]
            for name, model in self.service.models.items():
                lines.append(f"  {name}: {model.info.task}, context {model.info.context_length} "
                             f"({model.info.onnx_path})")
            print("\n".join(lines), flush=True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.service.slots.drain(self.grace)
        super().handle_exit(sig, frame)


def load_models(specs: list[str], threads: int | None = None, low_memory: bool = False) -> dict[str, Model]:
    """Each bundle loaded, named by its folder or by NAME in NAME=PATH; two of one name are an error."""
    models: dict[str, Model] = {}
    for spec in specs:
        name, given, path = spec.partition("=")
        if not given or Path(spec).exists():
            name, path = "", spec
        model = load(path, threads=threads, low_memory=low_memory)
        name = name or model.info.directory.name
        if name in models:
            raise KninferError(f"two bundles are named '{name}': name them apart with NAME=PATH")
        models[name] = model
    return models


def build_server(models: dict[str, Model], host: str = "127.0.0.1", port: int = 8000, *, max_concurrency: int = 4,
                 max_queue: int = 32, timeout: float = 300.0, grace: float = 10.0, api_key: str | None = None,
                 log_level: str = "info") -> Server:
    """A uvicorn server of the models; uvicorn cancels what still runs `grace` + 5 s after a shutdown begins."""
    service = Service(models, max_concurrency, max_queue, timeout, api_key)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=math.ceil(grace) + 5)
    return Server(config, service, grace)


def serve(server: Server) -> None:
    """Run the server until SIGTERM or Ctrl-C, then return after its graceful shutdown."""
    previous: Callable[..., Any] | int | None = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run()  # uvicorn raises the signal it caught again once shut down: KeyboardInterrupt for both
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
