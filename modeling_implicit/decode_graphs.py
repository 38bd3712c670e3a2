"""CUDA-graph decoding: the solver iterations of a single-token sequential step, captured once and replayed.

A decode step of an implicit model is many small evaluations of the layer stack; on a GPU at small batch their
kernel launches and the host synchronisation of each convergence test cost more than the arithmetic. Here a chunk of
`convergence_check_interval` iterations (stack evaluation plus solver bookkeeping) is captured in a CUDA graph over
static buffers: each token copies its inputs (injection, padding mask, committed states, start) into them, replays
the chunk until no sample is active, and tests convergence on the host once per chunk. Samples that converge inside a
chunk are frozen on the device exactly as in eager mode, so outputs are those of the eager solver.

With `compile_decoding` the chunk is compiled by `torch.compile` into one graph (stack evaluation and Picard update,
over the same static buffers, so the graph's inputs never change identity and it never recompiles across tokens), on
any device; on CUDA with `cuda_graph_decoding` too, the compiled chunk is what the CUDA graph captures.

A graph is built the second consecutive time a key (shapes, dtypes, settings) is seen: a shape that repeats every
token gets one (Mamba2's fixed-size states; Llama's whole key/value buffers, whose width changes only when the cache
doubles its room: the family's `static_decode_inputs`), while the first token of a shape, a new batch size included,
runs eagerly. Without CUDA and compile the same static-buffer path runs as it is (how the tests check it).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import astuple, fields, replace
from typing import Any

import torch

from .solver import SolverSettings, make_update, run_in_chunks, solver_iteration
from .solver_ops import FixedPointResult, SolveState

# Graphs kept per model; each holds its static buffers (a few copies of the committed states).
_CAPACITY = 2


def _recompile_limit_error() -> type[BaseException] | tuple[()]:
    """What `fullgraph` compiling raises once a code object reached torch's recompile limit (`()`: catches nothing
    on a torch without it)."""
    return getattr(getattr(torch, "_dynamo", None) and torch._dynamo.exc, "FailOnRecompileLimitHit", ())


def compile_chunk(chunk: Callable[[], None]) -> Callable[[], None]:
    """`chunk` (a fixed number of solver iterations over static buffers) compiled into one graph: `fullgraph`, so a
    graph break fails loudly instead of silently running eager pieces."""
    return torch.compile(chunk, fullgraph=True, dynamic=False)


def _static_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_static_copy(v) for v in value)
    return value


def _copy_into(static: Any, value: Any) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, tuple):
        for s, v in zip(static, value):
            _copy_into(s, v)


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device)
    if isinstance(value, tuple):
        return tuple(_signature(v) for v in value)
    return value


class _TokenGraph:
    """Static buffers and (on CUDA) the captured chunk of one key."""

    def __init__(
        self,
        make_fn: Callable[[torch.Tensor | None, Any, Any], Callable],
        injection: torch.Tensor | None,
        stack_inputs: Any,
        states: tuple[torch.Tensor, ...] | None,
        start: torch.Tensor,
        settings: SolverSettings,
        capture: bool,
        compile_chunks: bool = False,
    ):
        self.settings = settings
        self.injection = _static_copy(injection)
        self.stack_inputs = replace(
            stack_inputs, **{f.name: _static_copy(getattr(stack_inputs, f.name)) for f in fields(stack_inputs)}
        )
        self.states = _static_copy(states)
        self.fn = make_fn(self.injection, self.stack_inputs, self.states)
        # One eager iteration gives the static solver state its shapes (out, aux); each token resets it.
        self.update = make_update(settings)  # Picard only (`use_decode_graphs`): stateless, so one serves every token
        self.state = solver_iteration(self.fn, SolveState.start(start.clone()), self.update)
        self.state = replace(
            self.state, **{f.name: _static_copy(getattr(self.state, f.name)) for f in fields(self.state)}
        )
        interval = settings.convergence_check_interval
        self.compiled: Callable[[], None] | None = None
        if compile_chunks:
            self.compiled = compile_chunk(lambda: self._chunk(interval))
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture()

    def _interval(self) -> None:
        """One chunk of `convergence_check_interval` iterations, compiled when asked for. Every graph compiles the
        same code, so a process that compiled torch's recompile limit of them (8: batch sizes, Llama's buffer widths)
        runs the rest eagerly; the failed compile ran nothing, so the chunk runs from the same state."""
        if self.compiled is not None:
            try:
                self.compiled()
                return
            except _recompile_limit_error():
                warnings.warn(
                    "compile_decoding: torch's recompile limit (torch._dynamo.config.recompile_limit) is reached in "
                    "this process; this shape decodes eagerly.", RuntimeWarning, stacklevel=2,
                )
                self.compiled = None
        self._chunk(self.settings.convergence_check_interval)

    def _chunk(self, iterations: int) -> None:
        state = self.state
        for _ in range(iterations):
            state = solver_iteration(self.fn, state, self.update)
        for f in fields(state):
            _copy_into(getattr(self.state, f.name), getattr(state, f.name))

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (lazy library initialisation, compiling)
            for _ in range(2):
                self._interval()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._interval()

    def solve(
        self, injection: torch.Tensor | None, stack_inputs: Any, states: tuple[torch.Tensor, ...] | None,
        start: torch.Tensor,
    ) -> FixedPointResult:
        _copy_into(self.injection, injection)
        for f in fields(stack_inputs):
            _copy_into(getattr(self.stack_inputs, f.name), getattr(stack_inputs, f.name))
        _copy_into(self.states, states)
        state = self.state
        state.z.copy_(start)
        state.active.fill_(True)
        state.iterations.zero_()
        state.residual.fill_(float("inf"))
        state.converged.zero_()
        state.diverged_at.zero_()
        state.step.zero_()

        evaluations = 0

        def run_chunk(iterations: int, all_active: bool) -> SolveState:
            nonlocal evaluations
            evaluations += iterations
            if iterations != self.settings.convergence_check_interval:  # the remainder below the interval: eager
                self._chunk(iterations)
            elif self.graph is not None:
                self.graph.replay()
            else:
                self._interval()
            return state

        run_in_chunks(self.settings, run_chunk)
        # The static buffers are overwritten by the next token: hand out copies.
        # Every row is evaluated until the chunk in which the last one stops (the graph's shapes are fixed).
        return FixedPointResult(
            state.out.clone(), _static_copy(state.aux), replace(state.stats(), **{
                name: getattr(state, name).clone() for name in ("iterations", "residual", "converged")
            }, evaluations=torch.full_like(state.iterations, evaluations))
        )


class DecodeGraphs:
    """The token graphs of one model, by key; see the module docstring."""

    def __init__(self) -> None:
        self.graphs: OrderedDict[Any, _TokenGraph] = OrderedDict()
        self.last_key: Any = None

    def solve(
        self,
        make_fn: Callable[[torch.Tensor | None, Any, Any], Callable],
        injection: torch.Tensor | None,
        stack_inputs: Any,
        states: tuple[torch.Tensor, ...] | None,
        start: torch.Tensor,
        settings: SolverSettings,
        capture: bool,
        weights: tuple[int, ...] = (),
        compile_chunks: bool = False,
    ) -> FixedPointResult | None:
        """Solve one token with a graph of this key, capturing it when the key repeats; None: solve it eagerly.
        `weights` (the parameters' addresses) is part of the key: a graph reads the weights it was captured with."""
        key = (
            weights,
            _signature(injection),
            tuple((f.name, _signature(getattr(stack_inputs, f.name))) for f in fields(stack_inputs)),
            _signature(states),
            _signature(start),
            astuple(settings),
            capture,
            compile_chunks,
        )
        graph = self.graphs.get(key)
        if graph is None:
            repeated = key == self.last_key
            self.last_key = key
            if not repeated:
                return None
            graph = _TokenGraph(make_fn, injection, stack_inputs, states, start, settings, capture, compile_chunks)
            self.graphs[key] = graph
            if len(self.graphs) > _CAPACITY:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        self.last_key = key
        return graph.solve(injection, stack_inputs, states, start)
