"""The runtime: drives every state's op queue and batches generations.

Each *round* starts every state's next runnable ops (prompt text, forks,
captures finish at once; a generation is submitted to the engine and stays
in flight), then calls ``engine.step()`` exactly once. Every branch created
by a fork therefore advances in the same batched engine steps: the number of
steps grows with the depth of the tree, not with the number of branches.

Program code runs in ordinary Python. When it reads a value that is not ready
(``s["x"]``) the runtime runs rounds until it is. With ``run_batch`` each
program instance runs in its own thread, and rounds only start once every
instance is waiting, so all instances share the same engine steps.

Limits, so that a runaway program ends with an error instead of running
forever: at most ``max_steps`` engine steps (`DEFAULT_MAX_STEPS`) and at
most ``max_branches`` live branches (`MAX_BRANCHES`: states neither released
nor forked). An op queued inside ``with rt.origin(site):`` carries ``site``;
when the op fails (or is running when the budget runs out) the runtime raises
``site.wrap(exc)`` instead of ``exc``, so a script's error names the line
that queued the op, not the line that happened to wait for it.

Streaming: with ``on_text``, each generation's text is handed out as it is
produced: after every engine step ``on_text(state, name, delta)`` gets the
new text of each gen in flight (`dendrite.stopping.TextDeltas`: never half a
character, never text a stop string will cut), and the rest when it
finishes; one gen's deltas join to its capture. A ranked ``select`` does
not stream. What the callback raises stops the run, as with ``progress``.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from dendrite.program.state import MAX_FORK, State, _GenOp, _Op, derive_seed
from dendrite.program.tree import Tree

#: Engine steps a run may take unless told otherwise (hours of decoding on a
#: GPU at full speed: generous, yet a runaway loop does end).
DEFAULT_MAX_STEPS = 1_000_000
#: Live branches (states neither released nor forked) a run may hold at once.
MAX_BRANCHES = MAX_FORK

#: Failures of an op that mean "this op/input failed", so are reported at the
#: op's origin. Anything else (AttributeError, an engine InvariantError...) is
#: a bug in dendrite and propagates untouched.
OP_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, ArithmeticError, LookupError, RuntimeError, MemoryError,
)


class ProgramAborted(BaseException):
    """Raised inside a program thread when its batch was aborted."""


class StepBudgetExceeded(RuntimeError):
    """The run took its ``max_steps`` engine steps and still had work queued."""


class ProgressStop(BaseException):
    """Carries an exception raised by the ``progress`` callback past program code.

    A callback raises to stop the run (a server's deadline or cancel); program
    code (or a script's error handling) must neither swallow nor re-word it.
    `Program.run_batch` re-raises ``exc`` itself."""

    def __init__(self, exc: BaseException):
        super().__init__(exc)
        self.exc = exc


class _Task:
    """One program instance of a batch, run in a thread and resumed by the runtime."""

    def __init__(self, rt: "Runtime", fn: Callable[[], Any], name: str):
        self.rt = rt
        self.fn = fn
        self.resume = threading.Semaphore(0)
        self.yielded = threading.Semaphore(0)
        self.cond: Callable[[], bool] | None = None
        self.done = False
        self.aborted = False
        self.result: Any = None
        self.exc: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        self.resume.acquire()
        self.rt._local.task = self
        try:
            if not self.aborted:
                self.result = self.fn()
        except ProgramAborted:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self.exc = e
        finally:
            self.done = True
            self.yielded.release()

    def switch_in(self) -> None:
        """Run the task until it waits or ends (called by the scheduler)."""
        self.resume.release()
        self.yielded.acquire()


class Runtime:
    """Runs the op queues of all states of one or more program instances."""

    def __init__(
        self,
        engine: Any,
        progress: Callable[["Runtime"], None] | None = None,
        *,
        max_steps: int | None = None,
        max_branches: int | None = None,
        on_text: Callable[[State, str, str], None] | None = None,
        gen_defaults: dict[str, Any] | None = None,
    ):
        #: Sampling options every gen of the run gets unless it sets them (``run(temperature=0)``).
        self.gen_defaults: dict[str, Any] = dict(gen_defaults or {})
        self.on_text = on_text
        self._streams: dict[int, Any] = {}  # id(handle) -> TextDeltas, with on_text
        self.max_steps = _limit("max_steps", DEFAULT_MAX_STEPS if max_steps is None else max_steps)
        self.max_branches = _limit("max_branches", MAX_BRANCHES if max_branches is None else max_branches)
        self.live_branches = 0  # states neither released nor forked
        self.engine = engine
        self.tree = Tree()
        self.steps = 0  # engine.step() calls made by this runtime
        self.gen_tokens = 0
        self.finished_gens = 0
        self.progress = progress
        self._pending: dict[int, State] = {}  # node id -> state with queued ops
        self._inflight: dict[int, tuple[Any, State, _GenOp, float]] = {}
        self._awaiting_prefill: set[int] = set()  # states whose fork waits for a step
        self._stalls = 0  # consecutive engine steps that ran nothing
        self._states: list[State] = []
        self._constraints: dict[Any, Any] = {}
        self._local = threading.local()
        self._t0 = time.perf_counter()

    # ---------------------------------------------------------- states

    def new_root(self, seed: int | None = None, path: str = "0", label: str | None = None) -> State:
        """A fresh root state over a new, empty engine sequence."""
        node = self.tree.add(None, label, path, None)
        s = State(self, node, None, derive_seed(seed, path))
        node.seed = s.seed
        s._root_seed = seed
        s._lazy_root = True
        self._take_branches(None, 1)
        self._states.append(s)
        return s

    def _new_child(self, parent: State, label: str | None, path: str) -> State:
        node = self.tree.add(parent.node.id, label, path, None)
        seed = derive_seed(parent._root_seed, path)
        s = State(self, node, parent, seed)
        s._root_seed = parent._root_seed
        node.seed = seed
        self._states.append(s)
        return s

    # ---------------------------------------------------------- limits, origins

    def _take_branches(self, parent: State | None, n: int) -> None:
        """Count ``n`` new children of ``parent`` (None: a new root) as live, or
        raise a ValueError naming ``n`` when that passes `max_branches`."""
        replaces = 1 if parent is not None and n and parent._leaf else 0
        after = self.live_branches - replaces + n
        if after > self.max_branches:
            what = "a new root" if parent is None else f"fork: n={n}"
            raise ValueError(
                f"{what} would make {after} live branches, over this run's limit of "
                f"max_branches={self.max_branches} (release or prune branches first)"
            )
        if replaces:
            parent._leaf = False
        self.live_branches = after

    def _drop_branch(self, state: State) -> None:
        if state._leaf:
            state._leaf = False
            self.live_branches -= 1

    def current_origin(self) -> Any:
        """The origin ops queued now get (set by `origin`), or None."""
        return getattr(self._local, "origin", None)

    def set_origin(self, site: Any) -> Any:
        """Make ``site`` the origin of ops queued by this thread; returns the previous one."""
        prev = getattr(self._local, "origin", None)
        self._local.origin = site
        return prev

    @contextmanager
    def origin(self, site: Any) -> Iterator[None]:
        """Ops queued inside the block carry ``site`` (see the module docstring)."""
        prev = self.set_origin(site)
        try:
            yield
        finally:
            self._local.origin = prev

    def _located(self, op: _Op | None, state: State | None, exc: BaseException) -> BaseException:
        """``exc`` as an error about ``op``: wrapped by its origin, else with a note."""
        if op is not None and op.origin is not None:
            return op.origin.wrap(exc)
        if op is not None and state is not None and hasattr(exc, "add_note"):
            describe = getattr(op, "describe", None)
            what = describe() if describe else type(op).__name__.strip("_").lower()
            exc.add_note(f"(in {what} of state #{state.id})")
        return exc

    def _blame(self) -> tuple[_Op | None, State | None]:
        """The op to report a run-wide failure at: the oldest running gen, else
        the first queued op."""
        for _, st, op, _ in self._inflight.values():
            return op, st
        for nid in sorted(self._pending):
            st = self._pending[nid]
            if st._queue:
                return st._queue[0], st
        return None, None

    # ---------------------------------------------------------- queues

    def _enqueue(self, state: State, op) -> None:
        state._queue.append(op)
        self._pending[state.node.id] = state

    def _release_seq(self, state: State) -> None:
        if state._seq is not None and not state.node.released:
            state._seq.release()
        state._lazy_root = False
        state.node.released = True
        state.node.finished = self.tree.now()

    # ---------------------------------------------------------- engine

    def constraint(self, kind: str, spec: Any) -> Any:
        """The compiled constraint for ``(kind, spec)``, compiled once per runtime."""
        from dendrite.program.constraints import compile_constraint, constraint_key

        key = constraint_key(kind, spec)
        c = self._constraints.get(key)
        if c is None:
            c = self._constraints[key] = compile_constraint(self.engine, kind, spec)
        return c

    def _submit(self, state: State, op: _GenOp) -> None:
        from dendrite.sampling import SamplingParams

        spec = op.spec
        params = SamplingParams(seed=state.seed, **spec.sampling_with(self.gen_defaults))
        cons = spec.constraint
        constraint = self.constraint(*cons) if cons else None
        handle = self.engine.submit(state._seq, params, constraint=constraint)
        state._inflight = handle
        self._inflight[id(handle)] = (handle, state, op, time.perf_counter())
        if self.on_text is not None:
            from dendrite.stopping import TextDeltas

            self._streams[id(handle)] = TextDeltas(self.engine.tokenizer, params.stop_strings,
                                                   params.include_stop)

    def _advance(self, state: State) -> None:
        q = state._queue
        while q and state._inflight is None:
            op = q[0]
            try:
                if state._seq is None and op.needs_seq:
                    if not state._lazy_root:
                        break  # a child waiting for its parent's fork
                    if not op.makes_seq:
                        state._seq = self.engine.new_sequence("")
                started = op.start(state, self)
            except OP_ERRORS as e:
                q.popleft()  # the failed op is gone; release_all frees the rest
                raise self._located(op, state, e) from e
            if started:
                q.popleft()
            else:
                break

    def _advance_all(self) -> None:
        self._awaiting_prefill.clear()
        for nid in sorted(self._pending):
            st = self._pending[nid]
            self._advance(st)
        for nid in [n for n, st in self._pending.items() if not st._queue]:
            del self._pending[nid]

    def round(self) -> bool:
        """Start all runnable ops, then one ``engine.step()`` if anything is in flight.

        Returns False when there was nothing to step (all queues idle or blocked).
        """
        self._advance_all()
        if not self._inflight and not self._awaiting_prefill:
            return False
        if self.steps >= self.max_steps:
            op, st = self._blame()
            raise self._located(op, st, StepBudgetExceeded(
                f"the run used its budget of {self.max_steps} engine steps with work still "
                f"queued (max_steps; dendrite run --max-steps)"))
        stats = getattr(self.engine, "stats", None)
        before = stats.get("steps") if isinstance(stats, dict) else None
        try:
            finished = self.engine.step()
        except OP_ERRORS as e:
            op, st = self._blame()
            raise self._located(op, st, e) from e
        self.steps += 1
        done_ids = {id(h) for h in finished}
        completed = 0
        for key, (h, _, _, _) in list(self._inflight.items()):
            if key in done_ids or getattr(h, "done", False):
                self._complete(key)
                completed += 1
        if before is not None and stats.get("steps") == before and not completed:
            self._stalls += 1
            if self._stalls >= 3:
                stuck = ", ".join(f"#{st.id}" for _, st, _, _ in self._inflight.values())
                op, st = self._blame()
                raise self._located(op, st, RuntimeError(
                    f"the engine ran nothing for states {stuck}: their generations can "
                    "never be scheduled (no pending token to compute logits from)"
                ))
        else:
            self._stalls = 0
        self._stream_inflight()
        self._advance_all()
        if self.progress is not None:
            try:
                self.progress(self)
            except Exception as e:  # noqa: BLE001 - the callback stops the run
                raise ProgressStop(e) from e
        return True

    def _emit_text(self, state: State, op: _GenOp, delta: str) -> None:
        if not delta:
            return
        try:
            self.on_text(state, op.spec.name, delta)
        except Exception as e:  # noqa: BLE001 - the callback stops the run
            raise ProgressStop(e) from e

    def _stream_inflight(self) -> None:
        """Hand ``on_text`` the new text of every gen still in flight."""
        for key, (h, st, op, _) in list(self._inflight.items()):
            stream = self._streams.get(key)
            ids = getattr(h, "token_ids", None)
            if stream is not None and ids is not None:
                self._emit_text(st, op, stream.feed(list(ids)))

    def _complete(self, key: int) -> None:
        handle, state, op, t0 = self._inflight.pop(key)
        stream = self._streams.pop(key, None)
        complete = getattr(op, "complete", None)
        if complete is not None:  # an op with its own in-flight item (a ranked select)
            state._inflight = None
            state._queue.popleft()
            try:
                complete(state, handle, time.perf_counter() - t0)
            except OP_ERRORS as e:
                raise self._located(op, state, e) from e
            self.finished_gens += 1
            return
        result = handle.result
        if result.finish_reason == "error":
            # The engine failed this request alone (NaN logits, a leaf too
            # large...). Its text is not a generation: fail the op.
            state._inflight = None
            state._queue.popleft()
            err = getattr(handle, "error", None) or RuntimeError("the engine failed this generation")
            raise self._located(op, state, err) from err
        ids = list(result.token_ids)
        if result.finish_reason == "eos":
            ids += self._keep_eos(state)
        context = self.engine.tokenizer.decode(ids, skip_special_tokens=False)
        matched = getattr(result, "matched_stop", None)
        if result.finish_reason == "stop" and isinstance(matched, str):
            # The state's text follows the capture: the stop string is cut
            # (kept with include_stop) although its tokens are in the sequence.
            k = context.find(matched)
            if k >= 0:
                include = getattr(getattr(handle, "params", None), "include_stop", False)
                context = context[:k + len(matched)] if include else context[:k]
        if stream is not None:
            self._emit_text(state, op, stream.finish(result.text))
        op.finish(state, result, time.perf_counter() - t0, context)
        state._inflight = None
        state._queue.popleft()
        self.gen_tokens += len(result.token_ids)
        self.finished_gens += 1

    def _keep_eos(self, state: State) -> list[int]:
        """After an EOS the engine may hold no pending token for ``state``: then
        nothing could compute next-token logits for a later gen or fork of this
        branch. Put the EOS into the context (as the model saw it) so the
        branch can go on; returns the ids appended."""
        seq = state._seq
        if getattr(seq, "pending", None) != [] or getattr(seq, "released", False):
            return []
        tok = self.engine.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        if eos is None:
            ids = list(getattr(tok, "eos_token_ids", ()) or getattr(self.engine, "eos_token_ids", ()))
            if not ids:
                return []
            eos = ids[0]
        seq.append_tokens([int(eos)])
        return [int(eos)]

    @property
    def num_inflight(self) -> int:
        """Generations submitted and not finished."""
        return len(self._inflight)

    @property
    def num_pending_states(self) -> int:
        """States with queued ops."""
        return len(self._pending)

    @property
    def elapsed(self) -> float:
        """Seconds since the runtime started."""
        return time.perf_counter() - self._t0

    # ---------------------------------------------------------- waiting

    def wait(self, cond: Callable[[], bool]) -> None:
        """Block the calling program until ``cond()`` holds.

        Inside a batch task this hands control to the scheduler; otherwise it
        runs rounds right here.
        """
        if cond():
            return
        task = getattr(self._local, "task", None)
        if task is None:
            self._run_until(cond)
            return
        task.cond = cond
        task.yielded.release()
        task.resume.acquire()
        if task.aborted:
            raise ProgramAborted()

    def _run_until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            if not self.round() and not cond():
                op, st = self._blame()
                raise self._located(op, st, RuntimeError(
                    "program is waiting on a state that can never finish "
                    f"({len(self._pending)} states pending, nothing in flight)"
                ))

    def drain(self) -> None:
        """Run until every queued op of every state has finished."""
        self._run_until(lambda: not self._pending and not self._inflight)

    def run_tasks(self, fns: list[Callable[[], Any]]) -> list[Any]:
        """Run program instances as cooperative threads sharing engine steps."""
        tasks = [_Task(self, fn, f"dendrite-program-{i}") for i, fn in enumerate(fns)]
        for t in tasks:
            t.thread.start()
        try:
            for t in tasks:
                t.switch_in()
                if t.exc is not None:
                    raise t.exc
            while not all(t.done for t in tasks):
                woke = False
                for t in tasks:
                    if not t.done and t.cond is not None and t.cond():
                        t.cond = None
                        t.switch_in()
                        woke = True
                        if t.exc is not None:
                            raise t.exc
                if not woke and not self.round():
                    if not any(not t.done and t.cond is not None and t.cond() for t in tasks):
                        op, st = self._blame()
                        raise self._located(op, st, RuntimeError(
                            "program batch is stuck: nothing in flight"))
        except BaseException:
            for t in tasks:
                if not t.done:
                    t.aborted = True
                    t.resume.release()
            for t in tasks:
                t.thread.join(timeout=5)
            raise
        return [t.result for t in tasks]

    def close(self) -> None:
        """Finish queued work, then release every engine sequence still held."""
        try:
            self.drain()
        finally:
            self.release_all()

    def release_all(self) -> None:
        """Release all sequences (after errors too); pending ops are dropped."""
        for key in list(self._inflight):
            handle, state, _, _ = self._inflight.pop(key)
            self._streams.pop(key, None)
            cancel = getattr(self.engine, "cancel", None)
            abandon = getattr(handle, "abandon", None)
            if abandon is not None:  # several engine requests and branches of its own
                try:
                    abandon()
                except Exception:  # noqa: BLE001 - best effort on the error path
                    pass
            elif cancel is not None:
                try:
                    cancel(handle)
                except Exception:  # noqa: BLE001 - best effort on the error path
                    pass
            state._inflight = None
        for st in self._states:
            st._queue.clear()
            try:
                self._release_seq(st)
            except Exception:  # noqa: BLE001 - best effort
                st.node.released = True
        self._pending.clear()


def _limit(name: str, value: Any) -> int:
    """A positive int limit, or a ValueError/TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value
