"""`implicit-lm serve MODEL`: an OpenAI-compatible server whose callers choose the test-time compute of each request.

    implicit-lm serve models/implicit-mamba2-english --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    completion = client.completions.create(
        model="implicit-mamba2-english", prompt="In the beginning", max_tokens=32, temperature=0,
        extra_body={"solver_overrides": {"eval_max_iterations": 32, "tolerance": 1e-4}})
    completion.choices[0].text, completion.solver["iterations_per_token"]

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (for a tokenizer with a chat
template; a 400 naming the missing template otherwise), `GET /health`. Both generation endpoints stream
(`stream=True`, with `stream_options={"include_usage": True}` honoured) and answer with the `openai` package's own
response types, plus one field of ours: `solver`, the fixed-point iterations the request spent (the prompt's solve,
every generated token's, per token and in all, the share that converged, and the settings that applied); a streamed
response carries it on its last chunk. `solver_overrides` (the client's `extra_body`) applies the model's per-call
solver settings (`ImplicitPreTrainedConfig.with_overrides`: the same names and checks as
`model(..., solver_overrides=...)`) to that request only; a bad one is a 400 naming the field. Generations run one at
a time per model, in arrival order (as `generate` without continuous batching does), so concurrent requests queue;
the event loop stays free to accept and stream them.

The HTTP stack is FastAPI and uvicorn, the stack `transformers serve` is built on. `transformers serve` itself cannot
serve these models: it resolves a model's class in the `transformers` namespace (`config.architectures[0]`), which
remote code is not in, and since 5.2x it runs the model in an engine process that sends back only tokens, so a
response could not report the iterations spent; its internals also differ across the transformers versions we
support (docs/SERVING.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from implicit_lm.cli import InputError, run_cli

try:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as error:  # the `serve` extra
    raise ImportError(f"implicit-lm serve needs FastAPI and uvicorn: pip install 'implicit-lm[serve]' ({error})"
                      ) from error

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default `max_tokens` of /v1/completions
DEFAULT_CHAT_TOKENS = 256  # /v1/chat/completions without `max_tokens` (OpenAI's: up to the context length)
# Solver settings whose value bounds the work of one solve: a request may not raise them past the server's limit.
ITERATION_CAPS = ("eval_max_iterations", "max_iterations")


class RequestError(Exception):
    """A request the server refuses: answered as an OpenAI error object (`error.message`, `error.param`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass
class SamplingSettings:
    """One generation's settings, from the request (None: the model's generation config decides)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float | None = None


@dataclass
class Generation:
    """One finished generation: its text, tokens, why it stopped, and the solver work it took (None: no solver)."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: Literal["stop", "length"]
    solver: dict[str, Any] | None


class SolverSpend:
    """The iterations of every solve of one generation, from the `solver_stats` of each forward: the first forward
    is the prompt's (one solve over all positions in simultaneous mode, one per token in sequential mode), each later
    one a generated token's."""

    def __init__(self) -> None:
        self.forwards: list[tuple[int, int, int, int]] = []  # (iterations, solves, converged, most in one solve)

    def hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stats = getattr(output, "solver_stats", None)
        if stats is None:
            return
        iterations = stats.iterations.detach()
        self.forwards.append((int(iterations.sum()), iterations.numel(), int(stats.converged.sum()),
                              int(iterations.max())))

    def summary(self, settings: dict[str, Any]) -> dict[str, Any] | None:
        if not self.forwards:
            return None
        prompt, *decode = self.forwards
        decode_iterations = sum(entry[0] for entry in decode)
        solves = sum(entry[1] for entry in self.forwards)
        return {
            "iterations": prompt[0] + decode_iterations,
            "prompt_iterations": prompt[0],
            "decode_iterations": decode_iterations,
            "decode_steps": len(decode),
            # the tokens after the first, which the prompt's solve gave
            "iterations_per_token": decode_iterations / len(decode) if decode else None,
            "max_iterations_per_solve": max(entry[3] for entry in self.forwards),
            "converged_fraction": sum(entry[2] for entry in self.forwards) / solves,
            "settings": settings,
        }


class TextProgress:
    """The visible text of a generation as its tokens arrive: decoded, cut before the first stop string (OpenAI
    leaves it out), holding back a tail that may be the start of one and an incomplete UTF-8 character, so that a
    streamed delta never has to be taken back."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # the visible text sent so far
        self.stopped = False

    def update(self, generated_ids: list[int], final: bool = False) -> str:
        """The new visible text since the last call (all of the rest when `final`)."""
        text = self.tokenizer.decode(generated_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.stopped, visible = True, text[:min(cuts)]
        elif final:
            visible = text
        else:
            visible = text[:len(text) - self.holdback] if self.holdback else text
            visible = visible.rstrip("\ufffd")
        delta = visible[len(self.text):]
        self.text += delta
        return delta


class ModelServer:
    """One loaded model behind the endpoints: validates a request's solver settings and runs its generations, one at
    a time (`generate` holds a lock), reporting each one's text deltas as they come."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, max_tokens_limit: int,
                 max_solver_iterations: int):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_tokens_limit, self.max_solver_iterations = max_tokens_limit, max_solver_iterations
        # Ours and implicit: an explicit model (`implicit=False`, or any other causal LM) has no solver to set.
        self.implicit = callable(getattr(model.config, "with_overrides", None)) and bool(
            getattr(model.config, "implicit", False))
        self.created = int(time.time())
        self._lock = threading.Lock()

    def solver_overrides(self, overrides: Any) -> dict[str, Any] | None:
        """`overrides` checked as the model checks them, and against the server's iteration limit."""
        if overrides is None:
            return None
        if not isinstance(overrides, dict):
            raise RequestError("solver_overrides must be an object of solver settings", "solver_overrides")
        if not self.implicit:
            raise RequestError(f"{self.name} is not an implicit model: it has no solver to set", "solver_overrides")
        try:
            resolved = self.model.config.with_overrides(overrides)
        except (ValueError, TypeError) as error:  # the config's own checks name the field and its value
            names = sorted(overrides)
            message = str(error) if str(error).startswith("solver_overrides") else f"solver_overrides: {error}"
            raise RequestError(message, f"solver_overrides.{names[0]}" if len(names) == 1 else "solver_overrides"
                               ) from None
        for name in ITERATION_CAPS:
            if name in overrides and getattr(resolved, name) > self.max_solver_iterations:
                raise RequestError(
                    f"solver_overrides.{name}={getattr(resolved, name)} is above this server's limit of "
                    f"{self.max_solver_iterations} iterations per solve (--max-solver-iterations)",
                    f"solver_overrides.{name}")
        return overrides

    def solver_settings(self, overrides: dict[str, Any] | None) -> dict[str, Any]:
        config = self.model.config.with_overrides(overrides)
        return {name: getattr(config, name) for name in (
            "eval_max_iterations", "tolerance", "solver", "inference_mode", "prefill_mode", "warm_start")}

    def max_tokens(self, requested: int | None, default: int) -> int:
        value = default if requested is None else requested
        if value > self.max_tokens_limit:
            raise RequestError(f"max_tokens={value} is above this server's limit of {self.max_tokens_limit} "
                               "(--max-tokens-limit)", "max_tokens")
        return value

    def generate(self, prompt_ids: list[int], settings: SamplingSettings, overrides: dict[str, Any] | None,
                 on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None
                 ) -> Generation:
        """Generate from `prompt_ids`; `on_text` receives each new piece of visible text, and setting `cancelled`
        (the client left) stops the generation at its next token."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        progress = TextProgress(self.tokenizer, settings.stop)
        prompt_length = len(prompt_ids)

        class Progress(StoppingCriteria):
            # Called after every new token: streams the visible text and stops at a stop string or a cancellation.
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.Tensor:
                delta = progress.update(input_ids[0, prompt_length:].tolist())
                if delta and on_text is not None:
                    on_text(delta)
                done = progress.stopped or (cancelled is not None and cancelled.is_set())
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        options: dict[str, Any] = {"max_new_tokens": settings.max_tokens,
                                   "stopping_criteria": StoppingCriteriaList([Progress()])}
        if settings.temperature is not None:
            options.update(do_sample=settings.temperature > 0)
            if settings.temperature > 0:
                options["temperature"] = settings.temperature
        if settings.top_p is not None:
            options["top_p"] = settings.top_p
        if settings.repetition_penalty is not None:
            options["repetition_penalty"] = settings.repetition_penalty
        if overrides:
            options["solver_overrides"] = overrides
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is not None:
            options["pad_token_id"] = pad
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)
        spend = SolverSpend()
        with self._lock:
            if cancelled is not None and cancelled.is_set():
                raise RequestError("the client left before its generation started", status=499)
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            handle = self.model.register_forward_hook(spend.hook)
            try:
                with torch.no_grad():
                    output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **options)
            finally:
                handle.remove()
        generated = output[0, prompt_length:].tolist()
        delta = progress.update(generated, final=True)
        if delta and on_text is not None:
            on_text(delta)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        hit_eos = bool(generated) and generated[-1] in eos_ids
        finish_reason = "stop" if progress.stopped or hit_eos or len(generated) < settings.max_tokens else "length"
        return Generation(text=progress.text, completion_tokens=len(generated), prompt_tokens=prompt_length,
                          finish_reason=finish_reason,
                          solver=spend.summary(self.solver_settings(overrides)) if self.implicit else None)


# ---- requests: the OpenAI fields we take; any other field is a 400 naming it ----


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # newer OpenAI clients send it; nothing here to obfuscate


class GenerationRequest(StrictModel):
    """The fields both endpoints share. `user` (the caller's end-user id) is accepted and not used."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    solver_overrides: dict[str, Any] | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


# Fields of the OpenAI API this server has no implementation of: a value other than these is refused, not ignored.
UNSUPPORTED_UNLESS = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None,),
    "logprobs": (None, False, 0), "best_of": (None, 1), "top_logprobs": (None, 0),
}


def refuse_unsupported(request: GenerationRequest) -> None:
    for name, accepted in UNSUPPORTED_UNLESS.items():
        value = getattr(request, name, None)
        if value not in accepted:
            raise RequestError(f"{name}={value!r} is not supported by this server (leave it unset)", name)


def sampling_settings(request: GenerationRequest, max_tokens: int) -> SamplingSettings:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise RequestError("stop: up to 4 non-empty strings", "stop")
    return SamplingSettings(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p, stop=stop,
                            seed=request.seed)


def error_response(error: RequestError) -> JSONResponse:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return JSONResponse({"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}},
                        status_code=error.status)


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def total_solver(generations: list[Generation]) -> dict[str, Any] | None:
    """The solver work of a response: one generation's `solver`, or the sums over several (n > 1, prompt lists)."""
    spent = [g.solver for g in generations if g.solver is not None]
    if not spent:
        return None
    if len(spent) == 1:
        return spent[0]
    decode_steps = sum(s["decode_steps"] for s in spent)
    decode_iterations = sum(s["decode_iterations"] for s in spent)
    return {
        "iterations": sum(s["iterations"] for s in spent),
        "prompt_iterations": sum(s["prompt_iterations"] for s in spent),
        "decode_iterations": decode_iterations,
        "decode_steps": decode_steps,
        "iterations_per_token": decode_iterations / decode_steps if decode_steps else None,
        "max_iterations_per_solve": max(s["max_iterations_per_solve"] for s in spent),
        "converged_fraction": sum(s["converged_fraction"] for s in spent) / len(spent),
        "settings": spent[0]["settings"],
    }


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI application serving `server`'s model."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from implicit_lm import __version__

    app = FastAPI(title="implicit-lm", version=__version__)

    @app.exception_handler(RequestError)
    async def refused(_request: Any, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Any, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()

        def where(problem: dict[str, Any]) -> str:  # the field's path in the body ("solver_overrides", "messages.0")
            return ".".join(str(part) for part in problem["loc"][1:]) or "body"

        message = "; ".join(f"{where(problem)}: {problem['msg']}" for problem in problems)
        return error_response(RequestError(message, where(problems[0])))

    def check_model(request: GenerationRequest) -> None:
        if request.model not in (None, "", server.name):
            raise RequestError(f"The model {request.model!r} does not exist: this server serves {server.name!r}",
                               "model", status=404, code="model_not_found")

    def token_ids(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise RequestError(f"{param} is empty: give the model at least one token", param)
        vocabulary = server.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocabulary:
            raise RequestError(f"{param}: token ids must be in [0, {vocabulary})", param)
        return ids

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return token_ids(server.tokenizer(prompt)["input_ids"], "prompt")
        return token_ids(list(prompt), "prompt")

    def chat_prompt(messages: list[ChatMessage]) -> list[int]:
        tokenizer = server.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(
                f"{server.name}'s tokenizer has no chat template, so it cannot take chat messages: send text to "
                "/v1/completions instead", "messages", code="no_chat_template")
        conversation = [{
            "role": "system" if message.role == "developer" else message.role,  # OpenAI's newer name for system
            "content": message.content if isinstance(message.content, str) else "".join(
                part.text for part in message.content),
        } for message in messages]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return token_ids(tokenizer(text, add_special_tokens=False)["input_ids"], "messages")

    async def generate_all(prompts: list[list[int]], n: int, settings: SamplingSettings,
                           overrides: dict[str, Any] | None) -> list[Generation]:
        return [await asyncio.to_thread(server.generate, ids, settings, overrides) for ids in prompts
                for _ in range(n)]

    def stream(prompt_ids: list[int], settings: SamplingSettings, overrides: dict[str, Any] | None,
               chunk: Callable[..., dict[str, Any]], include_usage: bool) -> StreamingResponse:
        """Server-sent events: `chunk(text=...)` per new piece of text, `chunk(finish_reason=..., solver=...)` last,
        then (`include_usage`) a chunk with the usage and no choices, and `[DONE]`."""

        async def events() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            cancelled = threading.Event()

            def put(kind: str, value: Any) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

            def run() -> None:
                try:
                    put("done", server.generate(prompt_ids, settings, overrides, lambda text: put("text", text),
                                                cancelled))
                except Exception as error:  # noqa: BLE001 (reported in the stream, whose headers are sent)
                    put("error", error)

            threading.Thread(target=run, name="generation", daemon=True).start()
            try:
                yield sse(chunk(start=True))
                while True:
                    kind, value = await queue.get()
                    if kind == "text":
                        yield sse(chunk(text=value))
                    elif kind == "error":
                        if not isinstance(value, RequestError):
                            logger.error("generation failed", exc_info=value)
                        yield sse({"error": {"message": f"{type(value).__name__}: {value}", "type": "server_error"}})
                        return
                    else:
                        yield sse(chunk(finish_reason=value.finish_reason, solver=value.solver))
                        if include_usage:
                            yield sse(chunk(usage=usage([value]), solver=value.solver))
                        break
                yield sse("[DONE]")
            finally:
                cancelled.set()  # the client left (or all was sent): stop generating

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "implicit-lm"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> JSONResponse | StreamingResponse:
        check_model(request)
        refuse_unsupported(request)
        prompt = request.prompt
        prompts = [encode(p) for p in prompt] if isinstance(prompt, list) and prompt and not isinstance(
            prompt[0], int) else [encode(prompt)]
        overrides = server.solver_overrides(request.solver_overrides)
        settings = sampling_settings(request, server.max_tokens(request.max_tokens, DEFAULT_COMPLETION_TOKENS))
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        echoed = [server.tokenizer.decode(ids, skip_special_tokens=True) if request.echo else "" for ids in prompts]
        if request.stream:
            if len(prompts) != 1 or request.n != 1:
                raise RequestError("stream: one prompt and n=1 only", "stream")

            def chunk(text: str = "", start: bool = False, finish_reason: str | None = None,
                      solver: dict[str, Any] | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
                body: dict[str, Any] = {**identity, "object": "text_completion"}
                if usage is not None:
                    return {**body, "choices": [], "usage": usage, "solver": solver}
                body["choices"] = [{"index": 0, "text": echoed[0] if start else text, "logprobs": None,
                                    "finish_reason": finish_reason}]
                return {**body, "solver": solver} if finish_reason is not None else body

            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return stream(prompts[0], settings, overrides, chunk, include_usage)
        generations = await generate_all(prompts, request.n, settings, overrides)
        response = Completion.model_validate({
            **identity, "object": "text_completion", "usage": usage(generations),
            "choices": [{"index": index, "text": echoed[index // request.n] + g.text, "logprobs": None,
                         "finish_reason": g.finish_reason, "solver": g.solver}
                        for index, g in enumerate(generations)],
            "solver": total_solver(generations),
        })
        return JSONResponse(response.model_dump(mode="json"))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatRequest) -> JSONResponse | StreamingResponse:
        check_model(request)
        refuse_unsupported(request)
        prompt_ids = chat_prompt(request.messages)
        overrides = server.solver_overrides(request.solver_overrides)
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        settings = sampling_settings(request, server.max_tokens(requested, min(DEFAULT_CHAT_TOKENS,
                                                                                server.max_tokens_limit)))
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        if request.stream:
            if request.n != 1:
                raise RequestError("stream: n=1 only", "n")

            def chunk(text: str = "", start: bool = False, finish_reason: str | None = None,
                      solver: dict[str, Any] | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
                body: dict[str, Any] = {**identity, "object": "chat.completion.chunk"}
                if usage is not None:
                    return {**body, "choices": [], "usage": usage, "solver": solver}
                delta = {"role": "assistant", "content": ""} if start else {} if finish_reason else {"content": text}
                body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
                return {**body, "solver": solver} if finish_reason is not None else body

            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return stream(prompt_ids, settings, overrides, chunk, include_usage)
        generations = await generate_all([prompt_ids], request.n, settings, overrides)
        response = ChatCompletion.model_validate({
            **identity, "object": "chat.completion", "usage": usage(generations),
            "choices": [{"index": index, "message": {"role": "assistant", "content": g.text},
                         "finish_reason": g.finish_reason, "logprobs": None, "solver": g.solver}
                        for index, g in enumerate(generations)],
            "solver": total_solver(generations),
        })
        return JSONResponse(response.model_dump(mode="json"))

    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="implicit-lm serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Hub-layout model folder or Hub id (remote code is trusted, as `load_model` does)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the `model` clients send (default: the folder's name)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens-limit", type=int, default=2048,
                        help="most tokens one request may generate (default 2048)")
    parser.add_argument("--max-solver-iterations", type=int, default=1024,
                        help="highest iteration cap per solve a request's solver_overrides may set (default 1024)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = parser.parse_args(argv)
    for name in ("max_tokens_limit", "max_solver_iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port}: not a TCP port")
    return args


@run_cli
def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from implicit_lm.models import load_model

    args = parse_args(argv)
    # Each response reports the share of its solves that converged (`solver.converged_fraction`); a warning per
    # capped solve would only flood the server's log, as a request that lowers the cap expects them.
    warnings.filterwarnings("ignore", message="Fixed-point solver did not converge")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise InputError(f"{args.model} has no tokenizer: the server needs one to read prompts")
    name = args.served_model_name or args.model.rstrip("/").rsplit("/", 1)[-1]
    server = ModelServer(model, tokenizer, name, args.max_tokens_limit, args.max_solver_iterations)
    logger.info("serving %s as %r on http://%s:%d/v1", args.model, name, args.host, args.port)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
