"""CUDA graphs of the stage chain on cached steps: the rule, the cache, and the capture / replay path.

On a step where every merge site reuses its cached plan (no checkpoint),
the whole stage chain is a pure function of the model inputs (``sample``,
``timestep``, ``encoder_hidden_states``, and an SDXL model's added
conditioning) and the plan tensors of every site, with shapes fixed by
(batch, latent size, r per site) and the shapes of the conditioning (the
text length varies between prompts). Such a step is captured once as one
``torch.cuda.CUDAGraph`` and replayed afterwards, which removes the
per-stage launch and binding overhead of the Python walk.

The rule (what makes a replay valid)
------------------------------------
1. A graph is keyed by shapes only: :class:`GraphKey` = (batch, latent
   height, latent width, r per site, and the shape of every model input by
   name). r fixes every ``K{k}``/``R{k}`` dim (the plan tensors'); the model
   input shapes fix the rest, the text length above all: graphs outlive a
   generation and in ratio mode r repeats, so a prompt of another token
   length must not find a graph captured for the last one. The key
   therefore fixes every tensor shape in the chain. Another key means another graph (from the cache, or captured
   now). A key made from (batch, latent size, r) alone is completed from
   the inputs of the run (:meth:`GraphKey.with_inputs`).
2. A graph reads its inputs from static buffers, by address. The model
   inputs are copied into them before every replay. The plan tensors are
   copied in only when the site's plan *version* differs from the version
   the buffers hold: a checkpoint that produced new plans (new version ids,
   even with an equal r) makes those sites stale, and their five tensors are
   copied (device to device, no host sync) before the next replay. So new
   plans with unchanged shapes never force a recapture; new shapes always
   select another graph. A replay never runs with index tensors other than
   the current plans'.
3. Versions are opaque ids from the caller: an int that changes with every
   new plan, or the plan object itself (compared by identity; the cache keeps
   a reference, so an id is never reused while it is held).
4. Checkpoint steps are never captured: matching reads r back to the host in
   the middle of the chain. They run eagerly; the next cached step refreshes
   the stale sites of its graph as in rule 2.
5. Every graph owns the execution state it was captured on, and nothing
   else touches it until the graph is dropped. A TensorRT execution context
   holds input shapes and tensor addresses that a capture freezes into the
   graph; TensorRT does not promise that a graph stays valid once its
   context was re-shaped or re-enqueued, and NVIDIA's own tools capture once
   per context. So each graph is captured on a :class:`GraphChain` of its
   own: every stage runner that holds such state (a
   :class:`~catome_export.backends.base.ForkableStageRunner`) is forked for
   it, the fork being a new execution context on the same engine and the
   same shared scratch memory. Eager steps (checkpoints, the first steps)
   run on the runtime's original runners, on which no graph is ever
   captured. The alternative, one context per stage and a re-capture
   whenever an eager step used it in between, would re-capture every graph
   after every checkpoint (every few steps with the usual schedules), paying
   a capture and its warm-up each time and keeping almost nothing between
   checkpoints; extra contexts cost only their small persistent state, since
   they all share one scratch buffer (the backend enqueues every context on
   its one stream, so no two use it at once). Runners without such state
   (eager torch modules) are shared by the eager path and every graph.
6. Every graph is dropped (:meth:`ChainGraphCache.invalidate`), and its
   forked runners closed, when the addresses it baked in may have moved: the
   backend's shared scratch memory was reallocated (its ``generation``
   changed), stages were reloaded, or the runtime closes. At most
   ``max_entries`` graphs are kept (least recently used first out); each
   holds its activations in a shared memory pool.
7. Nothing is freed under running work: before a graph is dropped, or the
   runners of a failed capture closed, the streams its warm-up, capture and
   replays ran on are synchronised (the capture's ``synchronize()``), so a
   replay still in flight never reads a freed activation, context or
   scratch buffer.
8. A capture that fails (an op that cannot be captured, a stage whose
   enqueue fails under capture: a :class:`GraphCaptureError`, or any error
   that is not a :class:`CatomeError`) does not fail the step. As trtexec
   does, the runner falls back to plain enqueues: it logs one warning naming
   the real error (:class:`TorchCudaGraphCapture` reports the error raised
   inside the capture, not the "operation failed during capture" that
   ``capture_end`` raises after it), drops its graphs, and from then on runs
   cached steps stage by stage on a chain of its own. A stage that fails
   outside any capture (its warm-up run, with a CatomeError) raises that
   error as it would without graphs, and graphs stay on.

:class:`ChainGraphCache` is the pure bookkeeping (keys, lookup, insert,
invalidation, staleness), tested on CPU. :class:`ChainGraphRunner` applies
the rule around a capture implementation: :class:`TorchCudaGraphCapture`
on a GPU, or any object with the same two methods, and optionally
``synchronize()`` (tests use an eager one).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from catome_export.checks import check_int
from catome_export.backends.base import ForkableStageRunner
from catome_export.errors import CatomeError
from catome_export.engine.io_names import MODEL_OUTPUT, site_of

logger = logging.getLogger(__name__)

Chain = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
"""The stage chain of a cached step: model inputs + all plan tensors -> outputs (``noise_pred``)."""

def same_version(a: Any, b: Any) -> bool:
    """Plan versions match: identical objects, or equal ints / strings."""
    if a is b:
        return True
    return type(a) is type(b) and isinstance(a, (int, str)) and a == b


InputShapes = tuple[tuple[str, tuple[int, ...]], ...]
"""(name, shape) of every model input of a chain run, sorted by name."""


def input_shapes(inputs: Mapping[str, torch.Tensor]) -> InputShapes:
    """The shapes of the model inputs among ``inputs`` (every input but the ``site{k}_*`` plan tensors, whose
    shapes r per site fixes) as a key part: (name, shape) pairs sorted by name."""
    return tuple(sorted((name, tuple(int(d) for d in t.shape)) for name, t in inputs.items()
                        if site_of(name) is None))


@dataclass(frozen=True)
class GraphKey:
    """What fixes every shape in the chain: batch, latent size, r per site and the shape of every model input."""

    batch: int
    height: int
    width: int
    merged: tuple[int, ...]
    """r per site, in site order."""
    inputs: InputShapes = ()
    """(name, shape) of every model input, sorted by name: ``sample``, ``timestep``, the text
    (``encoder_hidden_states``, whose length varies with the prompt) and any added conditioning
    (``text_embeds``, ``time_ids``). Empty in a key not yet completed (:meth:`with_inputs`)."""

    def with_inputs(self, inputs: Mapping[str, torch.Tensor]) -> "GraphKey":
        """This key completed with the model input shapes of ``inputs``; CatomeError when it holds other ones."""
        shapes = input_shapes(inputs)
        if not self.inputs:
            return replace(self, inputs=shapes)
        if self.inputs != shapes:
            changed = sorted(set(self.inputs) ^ set(shapes))
            raise CatomeError(f"internal: the CUDA graph key does not describe the inputs of the run (differs in "
                              f"{changed})")
        return self


@dataclass(eq=False)
class GraphChain:
    """A chain for one captured graph: ``run`` walks stage runners whose execution state only this graph uses."""

    run: Chain
    owned: tuple[Any, ...] = ()
    """Runners forked for this graph (closed with it); runners without execution state are shared, not listed."""

    def close(self) -> None:
        """Release the forked runners (their execution contexts)."""
        for runner in self.owned:
            runner.close()
        self.owned = ()


ChainFactory = Callable[[], GraphChain]
"""Makes the :class:`GraphChain` a new capture runs on (one call per captured graph)."""


@dataclass(eq=False)
class GraphEntry:
    """One captured chain and the static buffers it reads and writes."""

    key: GraphKey
    graph: Any
    """A ``torch.cuda.CUDAGraph`` (or the capture implementation's handle)."""
    static_inputs: dict[str, torch.Tensor]
    static_outputs: dict[str, torch.Tensor]
    plan_versions: dict[int, Any] = field(default_factory=dict)
    """Site -> version of the plan tensors now in ``static_inputs``."""
    memory_generation: int = 0
    """Scratch-memory generation of the backend at capture."""
    replays: int = 0
    chain: GraphChain | None = None
    """The chain the graph was captured on; released when the entry is dropped."""

    def release(self) -> None:
        """Drop the graph, then close the runners it was captured on (it is never replayed again)."""
        self.graph = None
        if self.chain is not None:
            self.chain.close()


class ChainGraphCache:
    """Captured chains by :class:`GraphKey`, least recently used evicted first."""

    def __init__(self, max_entries: int = 4, on_drop: Callable[[GraphEntry], None] | None = None) -> None:
        """``on_drop``: called with every entry that leaves the cache (evicted, replaced or invalidated)."""
        self.max_entries = check_int("max CUDA graphs", max_entries, 1)
        self.on_drop = on_drop
        self._entries: OrderedDict[GraphKey, GraphEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self.plan_copies = 0

    @staticmethod
    def key(batch: int, latent_hw: tuple[int, int], r_per_site: Sequence[int] | Mapping[int, int],
            inputs: Mapping[str, torch.Tensor] | None = None) -> GraphKey:
        """The key of a chain run. ``r_per_site``: r in site order, or a {site: r} mapping. ``inputs``: the
        run's chain inputs, whose shapes complete the key (else :meth:`ChainGraphRunner.run` completes it).

        Plan versions are deliberately not part of the key (rule 2): new
        plans with the same r reuse the graph after a copy.
        """
        if isinstance(r_per_site, Mapping):
            merged = tuple(int(r_per_site[k]) for k in sorted(r_per_site))
        else:
            merged = tuple(int(r) for r in r_per_site)
        if batch < 1 or latent_hw[0] < 1 or latent_hw[1] < 1 or any(r < 0 for r in merged):
            raise CatomeError(f"bad CUDA graph key: batch {batch}, latent {latent_hw}, r {merged}")
        key = GraphKey(int(batch), int(latent_hw[0]), int(latent_hw[1]), merged)
        return key if inputs is None else key.with_inputs(inputs)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: GraphKey) -> bool:
        return key in self._entries

    def keys(self) -> list[GraphKey]:
        return list(self._entries)

    def lookup(self, key: GraphKey) -> GraphEntry | None:
        """The entry of ``key`` (marked most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def insert(self, entry: GraphEntry) -> list[GraphEntry]:
        """Add (or replace) an entry; returns the entries evicted to stay within ``max_entries``."""
        replaced = self._entries.get(entry.key)
        self._entries[entry.key] = entry
        self._entries.move_to_end(entry.key)
        if replaced is not None and replaced is not entry:
            self._dropped(replaced)
        evicted = []
        while len(self._entries) > self.max_entries:
            _, old = self._entries.popitem(last=False)
            evicted.append(old)
            self._dropped(old)
        return evicted

    def _dropped(self, entry: GraphEntry) -> None:
        if self.on_drop is not None:
            self.on_drop(entry)

    def invalidate(self, key: GraphKey | None = None, *, reason: str = "") -> int:
        """Drop the graph of ``key``, or every graph when ``key`` is None; returns how many were dropped."""
        if key is None:
            dropped = list(self._entries.values())
            self._entries.clear()
        else:
            entry = self._entries.pop(key, None)
            dropped = [] if entry is None else [entry]
        for entry in dropped:
            self._dropped(entry)
        count = len(dropped)
        if count:
            self.invalidations += count
            logger.debug("dropped %d CUDA graph(s)%s", count, f": {reason}" if reason else "")
        return count

    @staticmethod
    def stale_sites(entry: GraphEntry, plan_versions: Mapping[int, Any],
                    sites: Sequence[int] | None = None) -> list[int]:
        """Sites whose static plan buffers hold another version than ``plan_versions`` (rule 2).

        A site without a version (absent from ``plan_versions``) is always
        stale: its tensors are copied on every replay.
        """
        todo = sorted(set(sites) if sites is not None else set(entry.plan_versions) | set(plan_versions))
        stale = []
        for site in todo:
            if site not in plan_versions or site not in entry.plan_versions \
                    or not same_version(entry.plan_versions[site], plan_versions[site]):
                stale.append(site)
        return stale


class GraphCapture(Protocol):
    """How a chain is captured and replayed (CUDA graphs on a GPU; an eager double in tests)."""

    def capture(self, chain: Chain, static_inputs: Mapping[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """Capture ``chain`` on ``static_inputs``; return (handle, static outputs). Need not compute the outputs."""
        ...

    def replay(self, handle: Any) -> None:
        """Run the captured work: the static outputs then hold the results for the current static inputs."""
        ...


class GraphCaptureError(CatomeError):
    """A CUDA graph capture failed (not the chain: its warm-up ran); the runner falls back to plain runs."""


def capture_chain(graph_context: AbstractContextManager[Any], chain: Chain,
                  static_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run ``chain`` inside ``graph_context`` (a ``torch.cuda.graph``); return its outputs.

    When the capture fails, raise :class:`GraphCaptureError` naming the first error: the one the chain raised under
    capture (a TensorRT enqueue refused, an op not permitted while capturing), which the context's exit would
    otherwise replace with its own ("operation failed due to a previous error during capture"), or the exit's
    error when the chain itself ran through.
    """
    inner: Exception | None = None
    try:
        with graph_context:
            try:
                outputs = chain(static_inputs)
            except Exception as exc:
                inner = exc
                raise
    except Exception as exc:
        cause = inner if inner is not None else exc
        raise GraphCaptureError(f"CUDA graph capture failed: {type(cause).__name__}: {cause}") from cause
    return dict(outputs)


class TorchCudaGraphCapture:
    """:class:`GraphCapture` with ``torch.cuda.CUDAGraph`` (one memory pool shared by every graph).

    Warm-up runs on a side stream first (lazy initialisation in cuBLAS,
    cuDNN and TensorRT must not happen during capture). The graphs share one
    memory pool: they never run concurrently, and each replay's outputs are
    copied out before the next replay. ``stream``: the stream to capture on
    (the backend's own, so the captured TensorRT enqueues need no fork and
    join); by default a private side stream. Replays run on the caller's
    current stream. :meth:`synchronize` waits for every stream the warm-ups,
    captures and replays ran on.
    """

    def __init__(self, device: torch.device | str, warmup: int = 1, stream: "torch.cuda.Stream | None" = None) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise CatomeError("CUDA graphs need a CUDA device; run without them on this machine")
        self.warmup = int(warmup)
        self.stream = stream
        self.pool = torch.cuda.graph_pool_handle()
        self._streams: dict[int, torch.cuda.Stream] = {}
        """Streams work was enqueued on since the last :meth:`synchronize`, by handle."""

    def _used(self, stream: torch.cuda.Stream) -> None:
        self._streams[int(stream.cuda_stream)] = stream

    def capture(self, chain: Chain, static_inputs: Mapping[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """Warm up, then capture; :class:`GraphCaptureError` naming the real error when the capture fails (see
        :func:`capture_chain`), with the caller's stream current again and the partial graph freed. An error of
        the warm-up (a stage that fails without any capture) is raised as it is."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]  # torch.cuda.Stream.__new__ is unannotated
        self._used(side)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                chain(static_inputs)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        context = torch.cuda.graph(graph, pool=self.pool, stream=self.stream)
        if context.capture_stream is not None:
            self._used(context.capture_stream)
        try:
            outputs = capture_chain(context, chain, static_inputs)
        except GraphCaptureError:
            torch.cuda.set_stream(current)  # a failing capture_end skips restoring the caller's stream
            try:
                graph.reset()
            except Exception as exc:  # nothing was captured to free
                logger.debug("resetting the failed CUDA graph: %s", exc)
            raise
        return graph, outputs

    def replay(self, handle: Any) -> None:
        self._used(torch.cuda.current_stream(self.device))
        handle.replay()

    def synchronize(self) -> None:
        """Wait until every warm-up, capture and replay enqueued so far has finished."""
        for stream in self._streams.values():
            stream.synchronize()
        self._streams.clear()


class ChainGraphRunner:
    """Runs the chain of cached steps through captured graphs, following the module's rule.

    ``make_chain``: called once per capture, returns the :class:`GraphChain`
    the new graph owns (:func:`graph_chain` forks the stage runners; a pure
    function needs ``lambda: GraphChain(fn)``); its inputs include every
    ``site{k}_*`` plan tensor. ``memory_generation``: returns the backend's
    scratch-memory generation (rule 6); None if the backend has no shared
    memory.
    """

    def __init__(
        self,
        make_chain: ChainFactory,
        capture: GraphCapture,
        *,
        max_graphs: int = 4,
        memory_generation: Callable[[], int] | None = None,
    ) -> None:
        self.make_chain = make_chain
        self.capture_impl = capture
        self.cache = ChainGraphCache(max_graphs, on_drop=self._drop)
        self.memory_generation = memory_generation
        self.captures = 0
        self.capture_failure: str | None = None
        """Why capturing failed (rule 8); once set, cached steps run stage by stage on :attr:`plain_chain`."""
        self.plain_chain: GraphChain | None = None
        """The chain cached steps run on, stage by stage, after a failed capture."""
        self._input_names: frozenset[str] | None = None
        """The names of the chain's inputs, fixed by the first run (the key tells shapes apart, not chains)."""

    def _generation(self) -> int:
        return int(self.memory_generation()) if self.memory_generation is not None else 0

    def _synchronize(self) -> None:
        """Wait for the capture implementation's streams (rule 7), where it has any."""
        sync = getattr(self.capture_impl, "synchronize", None)
        if sync is not None:
            sync()

    def _drop(self, entry: GraphEntry) -> None:
        """Release a graph leaving the cache, once no work of it can still be running (rule 7)."""
        self._synchronize()
        entry.release()

    def run(self, key: GraphKey, inputs: Mapping[str, torch.Tensor],
            plan_versions: Mapping[int, Any]) -> dict[str, torch.Tensor]:
        """Replay (capturing first if needed) the graph of ``key`` on ``inputs``; returns fresh output tensors.

        ``key`` is completed with the shapes of ``inputs`` (rule 1), so a run whose text length differs from an
        earlier one's gets a graph of its own."""
        self._check_names(inputs)
        if self.capture_failure is not None:
            return self._run_plain(inputs)
        key = key.with_inputs(inputs)
        generation = self._generation()
        entry = self.cache.lookup(key)
        if entry is not None and entry.memory_generation != generation:
            self.cache.invalidate(reason="backend scratch memory moved")
            entry = None
        if entry is None:
            try:
                entry = self._capture(key, inputs, plan_versions, generation)
            except Exception as exc:
                if isinstance(exc, CatomeError) and not isinstance(exc, GraphCaptureError):
                    raise  # a stage failed as it would without graphs (e.g. in the warm-up): its own error
                self._fall_back(exc)  # rule 8: run without graphs, as trtexec does
                return self._run_plain(inputs)
        else:
            self._refresh(entry, inputs, plan_versions)
        self.capture_impl.replay(entry.graph)
        entry.replays += 1
        return {name: t.clone() for name, t in entry.static_outputs.items()}

    def _check_names(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """CatomeError unless ``inputs`` names the same tensors as every earlier run (one chain per runner)."""
        names = frozenset(inputs)
        if self._input_names is None:
            self._input_names = names
        elif names != self._input_names:
            raise CatomeError(f"CUDA graph inputs changed ({sorted(names ^ self._input_names)}): the graph key does "
                              "not describe the chain")

    def _capture(self, key: GraphKey, inputs: Mapping[str, torch.Tensor], plan_versions: Mapping[int, Any],
                 generation: int) -> GraphEntry:
        """Capture a new graph of ``key`` on a chain of its own (rule 5)."""
        static = {name: t.detach().clone() for name, t in inputs.items()}
        chain = self.make_chain()
        try:
            handle, outputs = self.capture_impl.capture(chain.run, static)
        except BaseException:
            self._synchronize()  # the warm-up may still run on the chain's contexts (rule 7)
            chain.close()
            raise
        entry = GraphEntry(key, handle, static, outputs, dict(plan_versions), generation, chain=chain)
        self.cache.insert(entry)
        self.captures += 1
        logger.debug("captured the stage chain for %s (%d forked runners)", key, len(chain.owned))
        return entry
    def _refresh(self, entry: GraphEntry, inputs: Mapping[str, torch.Tensor], plan_versions: Mapping[int, Any]) -> None:
        """Copy the model inputs, and the plan tensors of stale sites, into the static buffers."""
        if set(inputs) != set(entry.static_inputs):
            raise CatomeError(f"CUDA graph inputs changed ({sorted(set(inputs) ^ set(entry.static_inputs))}): "
                              "the graph key does not describe the chain")
        by_site: dict[int, list[str]] = {}
        for name, t in inputs.items():
            dst = entry.static_inputs[name]
            if dst.shape != t.shape:
                raise CatomeError(f"CUDA graph input {name!r} is {tuple(t.shape)}, the graph was captured with "
                                  f"{tuple(dst.shape)}: the graph key does not describe the shapes")
            site = site_of(name)
            if site is None:
                dst.copy_(t)
            else:
                by_site.setdefault(site, []).append(name)
        for site in self.cache.stale_sites(entry, plan_versions, sites=list(by_site)):
            for name in by_site[site]:
                entry.static_inputs[name].copy_(inputs[name])
            if site in plan_versions:
                entry.plan_versions[site] = plan_versions[site]
            self.cache.plan_copies += 1

    def _fall_back(self, error: Exception) -> None:
        """Stop capturing after a failed capture (rule 8): one warning, every graph dropped."""
        self.capture_failure = f"{type(error).__name__}: {error}"
        logger.warning("CUDA graph capture failed (%s); cached steps run stage by stage from now on",
                       self.capture_failure)
        self.cache.invalidate(reason="a capture failed")

    def _run_plain(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A cached step without graphs, stage by stage on a chain of this runner's own."""
        if self.plain_chain is None:
            self.plain_chain = self.make_chain()
        return dict(self.plain_chain.run(inputs))

    def invalidate(self, reason: str = "") -> None:
        """Drop every graph, and the chain of plain runs, once no work of theirs can still be running (stages
        reloaded, runtime closing)."""
        self.cache.invalidate(reason=reason)
        if self.plain_chain is not None:
            self._synchronize()
            self.plain_chain.close()
            self.plain_chain = None


def graph_chain(runners: Sequence[Any], outputs: Sequence[str] = (MODEL_OUTPUT,)) -> GraphChain:
    """A :class:`GraphChain` over ``runners`` for one captured graph: every runner that holds execution state
    (:class:`~catome_export.backends.base.ForkableStageRunner`, e.g. TensorRT) is forked, the rest shared."""
    used: list[Any] = []
    owned: list[Any] = []
    try:
        for runner in runners:
            if isinstance(runner, ForkableStageRunner):
                fork = runner.fork()
                owned.append(fork)
                used.append(fork)
            else:
                used.append(runner)
    except BaseException:
        for fork in owned:
            fork.close()
        raise
    return GraphChain(stage_chain(used, outputs), tuple(owned))


def stage_chain(runners: Sequence[Any], outputs: Sequence[str] = (MODEL_OUTPUT,)) -> Chain:
    """The chain of ``runners`` (StageRunner objects, in stage order) as one function of the model and plan inputs.

    Walks the stages with a name -> tensor environment, feeding each stage
    its inputs by name, and returns the tensors named in ``outputs``.
    """
    def chain(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(inputs)
        for runner in runners:
            feeds = {t.name: env[t.name] for t in runner.spec.inputs}
            env.update(runner.run(feeds))
        return {name: env[name] for name in outputs}
    return chain
