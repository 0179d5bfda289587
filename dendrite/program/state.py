"""`State`: one branch of a program, with a lazy queue of ops.

``s += "text"``, ``s.gen(...)``, ``s.fork(n)``, ``s["x"] = v`` and
``s.release()`` only *queue* ops. The `Runtime` runs every state's queue in
rounds and batches all pending generations into shared ``engine.step()``
calls. Reading a result (``s["x"]``, ``s.text``, ``s.logprob``) waits until
that state's queue is empty, which advances every other state too.
"""

from __future__ import annotations

import abc

import hashlib
from collections import deque
from typing import Any, Callable, Iterable, Protocol

from dendrite.program import chat
from dendrite.program.options import GenSpec, make_spec
from dendrite.program.tree import Node, Segment


class _Runtime(Protocol):
    """What a `State` needs of the runtime that drives it.

    `dendrite.program.runtime.Runtime` implements it; declared here, below the
    runtime, so that this module does not import the one that imports it."""

    engine: Any
    _awaiting_prefill: set[int]

    def current_origin(self) -> Any: ...
    def constraint(self, kind: str, spec: Any) -> Any: ...
    def wait(self, cond: Callable[[], bool]) -> None: ...
    def _enqueue(self, state: "State", op: Any) -> None: ...
    def _submit(self, state: "State", op: Any) -> None: ...
    def _release_seq(self, state: "State") -> None: ...
    def _take_branches(self, parent: "State | None", n: int) -> None: ...
    def _new_child(self, parent: "State", label: str | None, path: str) -> "State": ...
    def _drop_branch(self, state: "State") -> None: ...


class StateReleasedError(RuntimeError):
    """An op was queued on a state that was released (pruned, not selected...)."""


#: Most children one ``fork`` makes; the engine's own bound
#: (``dendrite.engine.MAX_FORK``, not imported here: it would load torch).
MAX_FORK = 1 << 16
#: Most forks between a root and a state. A state's path (which seeds it)
#: grows with its depth, so an unbounded chain of forks would cost quadratic
#: time before any engine step could stop it.
MAX_DEPTH = 10_000


def fork_count(n: Any, what: str = "n") -> int:
    """``n`` as a fork count in [0, MAX_FORK], or a TypeError/ValueError naming ``what``.

    Integral floats (``2.0``) are accepted; bools, other floats, strings are not.
    """
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"fork: {what} must be an int, got {n!r} of type {type(n).__name__}")
    n = n.__index__()
    if n < 0:
        raise ValueError(f"fork: {what} must be >= 0, got {n}")
    if n > MAX_FORK:
        raise ValueError(f"fork: {what}={n} exceeds the limit of {MAX_FORK} children per fork")
    return n


def derive_seed(seed: int | None, path: str) -> int | None:
    """A 63-bit seed from the run seed and a state's path in the tree."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{int(seed)}/{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _Concat:
    """``"Q: " + gen("a") + "\\n"``: an `Expr` sequence that ``s += ...`` appends in order."""

    __slots__ = ()

    def __add__(self, other: Any) -> "Expr":
        return Expr((self, other))

    def __radd__(self, other: Any) -> "Expr":
        return Expr((other, self))


class Expr(tuple):
    """Texts and generations to append in order (built by ``+``)."""

    def __add__(self, other: Any) -> "Expr":  # type: ignore[override]
        return Expr((*self, *(other if isinstance(other, Expr) else (other,))))

    def __radd__(self, other: Any) -> "Expr":
        return Expr((other, *self))


class Appendable(_Concat, abc.ABC):
    """Something ``s += x`` queues on the state itself (e.g. a ranked ``select``)."""

    __slots__ = ()

    @abc.abstractmethod
    def append_to(self, state: "State") -> None:
        """Queue this on ``state``."""


class GenExpr(_Concat):
    """A generation to append, SGLang style: ``s += dendrite.gen("x", ...)``."""

    __slots__ = ("spec",)

    def __init__(self, spec: GenSpec):
        self.spec = spec

    def __repr__(self) -> str:
        return f"gen({self.spec.name!r}, {self.spec.options})"


def gen(name: str | None = None, **options: Any) -> GenExpr:
    """``s += gen("answer", max_tokens=32, stop="\\n")``; same options as `State.gen`.

    Unnamed (``gen()``) the text is appended but not captured."""
    return GenExpr(make_spec(name, options))


#: SGLang's ``gen_int`` / ``gen_string`` regexes (``sglang.lang.ir.REGEX_INT`` / ``REGEX_STR``).
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_STRING = r"\"[\w\d\s]*\""


def gen_int(name: str | None = None, **options: Any) -> GenExpr:
    """A gen constrained to an integer (SGLang's ``gen_int``); the capture is its text."""
    return GenExpr(make_spec(name, {**options, "regex": REGEX_INT}))


def gen_string(name: str | None = None, **options: Any) -> GenExpr:
    """A gen constrained to a double-quoted string of word characters and spaces
    (SGLang's ``gen_string``); the capture is its text, quotes included."""
    return GenExpr(make_spec(name, {**options, "regex": REGEX_STRING}))


# ---------------------------------------------------------------- ops


class _Op(abc.ABC):
    """One queued operation. ``start`` returns True when it finished at once."""

    needs_seq = False  # must the state's engine sequence exist to start it?
    #: On a lazy root, does the op make the engine sequence itself (from its
    #: text)? Otherwise the runtime starts an empty one (a BOS) first.
    makes_seq = False
    #: Where the op was queued from (``Runtime.origin``): something with
    #: ``wrap(exc) -> exception`` that turns the op's failure into an error
    #: about that place (a script's ``file:line:col``), or None.
    origin: Any = None

    @abc.abstractmethod
    def start(self, state: "State", rt: "_Runtime") -> bool:
        """Begin the operation on ``state``."""


class _TextOp(_Op):
    needs_seq = True
    makes_seq = True

    def __init__(self, text: str, add_bos: bool = True):
        self.text = text
        self.add_bos = add_bos  # False for a chat template's text, which holds its own BOS

    def start(self, state, rt):
        if self.text:
            if state._seq is None:  # a lazy root: its first prompt may hit the prefix cache
                state._seq = rt.engine.new_sequence(self.text, add_bos=self.add_bos)
            else:
                state._seq.append_text(self.text)
            state._text += self.text
            state.node.segments.append(Segment("text", self.text))
        return True


class _GenOp(_Op):
    needs_seq = True

    def __init__(self, spec: GenSpec):
        self.spec = spec

    def start(self, state, rt):
        rt._submit(state, self)
        return False

    def describe(self) -> str:
        return f"gen {self.spec.name!r}"

    def finish(self, state: "State", result: Any, seconds: float, context: str) -> None:
        """Record a finished generation.

        ``result.text`` is the capture; ``context`` (the same text, with
        special tokens such as an EOS kept) is what the state's text gets.
        A matched stop string is in neither (both end with it under
        ``include_stop``), though its tokens are in the sequence. How the gen
        ended is its meta info: ``finish_reason``, ``matched_stop``,
        ``completion_tokens``.
        """
        text = result.text
        n = len(result.token_ids)
        lp = float(result.cumulative_logprob or 0.0)
        state._text += context
        if self.spec.name is not None:
            state._captures[self.spec.name] = text
        state._lp_sum += lp
        state._lp_tokens += n
        state._finish_reason = result.finish_reason
        if self.spec.name is not None:
            state._meta[self.spec.name] = {
                "finish_reason": result.finish_reason,
                "matched_stop": getattr(result, "matched_stop", None),
                "completion_tokens": n,
            }
        node = state.node
        if self.spec.name is not None:
            node.captures[self.spec.name] = text
        node.gen_tokens += n
        node.gen_seconds += seconds
        node.segments.append(
            Segment("gen", text, self.spec.name, n, lp, seconds, result.finish_reason)
        )


class _ForkOp(_Op):
    needs_seq = True

    def __init__(self, children: list["State"]):
        self.children = children

    def start(self, state, rt):
        if _needs_prefill(state._seq):
            # Let the next batched step prefill the parent instead of forcing
            # a flush (one engine step per parent) inside engine.fork.
            rt._awaiting_prefill.add(state.node.id)
            return False
        seqs = state._seq.fork(len(self.children))
        for child, seq in zip(self.children, seqs):
            child._seq = seq
            child._text = state._text
            child._captures = dict(state._captures)
            child._meta = dict(state._meta)
            child._lp_sum = state._lp_sum
            child._lp_tokens = state._lp_tokens
            child._finish_reason = state._finish_reason
            child._chat = None if state._chat is None else state._chat.copy()
        state.node.segments.append(Segment("fork", children=[c.node.id for c in self.children]))
        return True


def _needs_prefill(seq: Any) -> bool:
    """Does the engine still have prompt tokens of ``seq`` to run before a fork?

    The engine keeps an idle sequence's last token pending (children compute
    it themselves); only the tokens it would schedule count. A preempted idle
    sequence is not scheduled until used, so its fork flushes it directly.
    """
    if getattr(seq, "swapped", False):
        return False
    n = getattr(seq, "schedulable", None)
    if n is None:
        n = len(getattr(seq, "pending", None) or ())
    return n > 0


class _SetOp(_Op):
    def __init__(self, name: str, value: Any):
        self.name, self.value = name, value

    def start(self, state, rt):
        state._captures[self.name] = self.value
        state.node.captures[self.name] = self.value
        return True


class _CallOp(_Op):
    def __init__(self, fn):
        self.fn = fn

    def start(self, state, rt):
        self.fn(state)
        return True


class _RoleOp(_Op):
    """Begin or end a chat turn (`dendrite.program.chat`)."""

    needs_seq = True
    makes_seq = True  # a lazy root's sequence starts with the template's text (its own BOS)

    def __init__(self, role: str, begin: bool):
        self.role, self.begin = role, begin

    def start(self, state, rt):
        def append(text: str) -> None:
            _TextOp(text, add_bos=False).start(state, rt)

        tok = rt.engine.tokenizer
        if self.begin:
            log = chat.begin_turn(state._chat, state._text, tok, self.role, append)
            state._chat = log
            log.role, log.start = self.role, len(state._text)
        else:
            chat.end_turn(state._chat, state._text, tok, self.role, append)
        return True


class RoleScope:
    """``with s.user(): s += ...``: everything appended inside is the turn's content."""

    def __init__(self, state: "State", role: str):
        self.state, self.role = state, role

    def __enter__(self) -> "State":
        self.state._push(_RoleOp(self.role, True))
        return self.state

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.state._push(_RoleOp(self.role, False))


class RoleExpr(Appendable):
    """``s += user("hi")`` (SGLang's ``sgl.user(...)``)."""

    __slots__ = ("content", "role")

    def __init__(self, role: str, content: Any):
        self.role, self.content = role, content

    def append_to(self, state: "State") -> None:
        """Write this turn into `state` (what `state += user(...)` does)."""
        state._role(self.role, self.content)


def system(content: Any) -> RoleExpr:
    """A system turn to append: ``s += system("Be brief.")``."""
    return RoleExpr("system", content)


def user(content: Any) -> RoleExpr:
    """A user turn to append: ``s += user("Hi")``."""
    return RoleExpr("user", content)


def assistant(content: Any) -> RoleExpr:
    """An assistant turn to append: ``s += assistant(gen("answer"))``."""
    return RoleExpr("assistant", content)


class VarScope:
    """``with s.var_scope("name"):``: the text appended inside becomes ``s["name"]``."""

    def __init__(self, state: "State", name: str):
        if not isinstance(name, str) or not name:
            raise TypeError(f"var_scope needs a capture name (a non-empty string), got {name!r}")
        self.state, self.name = state, name

    def __enter__(self) -> "State":
        self.state.then(lambda st: st._marks.__setitem__(self.name, len(st._text)))
        return self.state

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            def capture(st: "State") -> None:
                text = st._text[st._marks.pop(self.name):]
                st._captures[self.name] = text
                st.node.captures[self.name] = text
            self.state.then(capture)


class _ReleaseOp(_Op):
    def start(self, state, rt):
        rt._release_seq(state)
        return True


# ---------------------------------------------------------------- state


class State:
    """A branch of a running program (SGLang's ``s``).

    Writing is lazy; reading waits. Children made by `fork` inherit the
    text, captures and logprob totals the parent has *at the fork point*.
    """

    def __init__(
        self,
        rt: "_Runtime",
        node: Node,
        parent: "State | None" = None,
        seed: int | None = None,
    ):
        self._rt = rt
        self.node = node
        self.parent = parent
        self._depth = 0 if parent is None else parent._depth + 1
        self.seed = seed
        self._seq: Any = None
        self._queue: deque[_Op] = deque()
        self._inflight: Any = None
        self._text = ""
        self._captures: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}  # per capture: how it was chosen
        self._lp_sum = 0.0
        self._lp_tokens = 0
        self._finish_reason: str | None = None
        self._score: float | None = None
        self._released = False  # release queued
        self._nforks = 0
        self._leaf = True  # counted in the runtime's live branches (not forked, not released)
        self._lazy_root = False  # root whose engine sequence starts with its first prompt
        self._root_seed: int | None = None
        self._chat: chat.ChatLog | None = None  # once a chat turn began
        self._marks: dict[str, int] = {}  # var_scope name -> where in the text it began

    # ---- writing (lazy) ----

    def _push(self, op: _Op) -> None:
        if self._released and (op.needs_seq or isinstance(op, _ReleaseOp)):
            raise StateReleasedError(f"state #{self.node.id} was released; it takes no more ops")
        if op.origin is None:
            op.origin = self._rt.current_origin()
        self._rt._enqueue(self, op)

    def __iadd__(self, other: "str | GenExpr | Iterable[str | GenExpr]") -> "State":
        if isinstance(other, str):
            self._push(_TextOp(other))
        elif isinstance(other, GenExpr):
            self.gen(other.spec.name, **other.spec.options)
        elif isinstance(other, Appendable):
            other.append_to(self)
        elif isinstance(other, (list, tuple)):
            for x in other:
                self.__iadd__(x)
        else:
            raise TypeError(f"cannot append {type(other).__name__} to a State")
        return self

    def append(self, text: str) -> "State":
        """Queue prompt text (same as ``s += text``)."""
        return self.__iadd__(str(text))

    def gen(self, name: str | None = None, **options: Any) -> "State":
        """Queue a generation captured as ``self[name]`` (``name=None``: not captured).

        Options: max_tokens, stop, stop_token_ids, temperature, top_p, top_k,
        min_p, repetition_penalty, ignore_eos, and at most one constraint of
        regex, json_schema, grammar, choices. Returns ``self``.
        """
        spec = make_spec(name, options)
        if spec.constraint is not None:
            self._rt.constraint(*spec.constraint)  # reject a bad regex/schema here
        self._push(_GenOp(spec))
        return self

    # ---- chat roles and scopes (dendrite.program.chat) ----

    def _role(self, role: str, content: Any = None) -> Any:
        scope = RoleScope(self, role)
        if content is None:
            return scope
        with scope:
            self += content
        return self

    def system(self, content: Any = None) -> Any:
        """Queue a system turn through the model's chat template: ``s.system("Be brief.")``;
        without content, a context manager (``with s.system(): s += ...``)."""
        return self._role("system", content)

    def user(self, content: Any = None) -> Any:
        """Queue a user turn (see `system`)."""
        return self._role("user", content)

    def assistant(self, content: Any = None) -> Any:
        """Queue an assistant turn: ``s.assistant(gen("answer"))`` (see `system`)."""
        return self._role("assistant", content)

    def var_scope(self, name: str) -> Any:
        """``with s.var_scope("name"): ...`` captures all text appended inside as ``s[name]``."""
        return VarScope(self, name)

    def fork(self, n: int, label: str | None = None) -> "StateGroup":
        """Queue an O(1) fork into ``n`` children; they run batched together.

        ``n`` is an int in [0, `MAX_FORK`]; the run's live branches (see
        `Runtime.max_branches`) may not exceed its limit, nor the children's
        depth `MAX_DEPTH`. Each is a ValueError (TypeError for a non-int),
        with nothing queued.
        """
        n = fork_count(n)
        if n and self._released:
            raise StateReleasedError(f"state #{self.node.id} was released; it takes no more ops")
        if n and self._depth >= MAX_DEPTH:
            raise ValueError(f"fork: state #{self.node.id} is already {self._depth} forks deep, "
                             f"the limit (MAX_DEPTH={MAX_DEPTH})")
        self._rt._take_branches(self, n)
        k = self._nforks
        self._nforks += 1
        kids = [self._rt._new_child(self, label, f"{self.node.path}.{k}.{j}") for j in range(n)]
        if n:
            self._push(_ForkOp(kids))
        group = StateGroup(kids)
        group.parent = self
        return group

    def __setitem__(self, name: str, value: Any) -> None:
        """Queue ``captures[name] = value`` (in order with the other ops)."""
        self._push(_SetOp(name, value))

    def then(self, fn) -> "State":
        """Queue ``fn(state)`` to run in order with the other ops."""
        self._push(_CallOp(fn))
        return self

    def release(self) -> None:
        """Queue the release of this branch's engine sequence (idempotent)."""
        if not self._released:
            self._push(_ReleaseOp())
            self._released = True
            self._rt._drop_branch(self)

    # ---- reading (waits) ----

    def wait(self) -> "State":
        """Run until every op queued on this state has finished."""
        self._rt.wait(lambda: self.done)
        return self

    @property
    def done(self) -> bool:
        """True when no op of this state is pending (does not wait)."""
        return not self._queue and (
            self._seq is not None or self._lazy_root or self.node.released
        )

    def __getitem__(self, name: str) -> Any:
        self.wait()
        try:
            return self._captures[name]
        except KeyError:
            raise KeyError(
                f"state #{self.node.id} has no capture {name!r} "
                f"(captures: {sorted(self._captures)})"
            ) from None

    def meta_info(self, name: str) -> dict[str, Any]:
        """How capture ``name`` was made. A gen: ``finish_reason``,
        ``matched_stop`` (the stop string or stop token id that ended it, else
        None) and ``completion_tokens``. A ranked ``select``: ``method``,
        ``choices``, ``scores`` (by the method), ``sum_logprobs``,
        ``mean_logprobs``, ``token_logprobs`` (per choice) and the winner's ``index``."""
        self.wait()
        try:
            return self._meta[name]
        except KeyError:
            raise KeyError(f"state #{self.node.id} has no select meta info for {name!r} "
                           f"(has: {sorted(self._meta)})") from None

    def get(self, name: str, default: Any = None) -> Any:
        """``self[name]`` or ``default``."""
        self.wait()
        return self._captures.get(name, default)

    def __contains__(self, name: str) -> bool:
        self.wait()
        return name in self._captures

    @property
    def captures(self) -> dict[str, Any]:
        """A copy of all captured values (inherited ones included)."""
        self.wait()
        return dict(self._captures)

    @property
    def text(self) -> str:
        """The whole text of this branch: prompts and generations."""
        self.wait()
        return self._text

    @property
    def num_gen_tokens(self) -> int:
        """Tokens generated on the path from the root to this state."""
        self.wait()
        return self._lp_tokens

    @property
    def sum_logprob(self) -> float:
        """Sum of generated-token logprobs on the path (0.0 when none)."""
        self.wait()
        return self._lp_sum

    @property
    def logprob(self) -> float:
        """Mean generated-token logprob on the path (0.0 when none)."""
        self.wait()
        return self._lp_sum / self._lp_tokens if self._lp_tokens else 0.0

    @property
    def finish_reason(self) -> str | None:
        """Why the last generation stopped: "stop", "eos" or "length"."""
        self.wait()
        return self._finish_reason

    @property
    def score(self) -> float | None:
        """The last score given by select/prune/search, or set by hand."""
        return self._score

    @score.setter
    def score(self, value: float | None) -> None:
        self._score = None if value is None else float(value)
        self.node.score = self._score

    @property
    def id(self) -> int:
        """The node id of this state in the explored tree."""
        return self.node.id

    @property
    def depth(self) -> int:
        """Number of forks between the root and this state."""
        return self._depth

    @property
    def released(self) -> bool:
        """Whether the state was released (pruned, not selected, or by hand)."""
        return self._released

    @property
    def runtime(self) -> Any:
        """The `dendrite.program.runtime.Runtime` that runs this state."""
        return self._rt

    def __repr__(self) -> str:
        status = "released" if self._released else ("done" if self.done else "pending")
        return f"<State #{self.node.id} {self.node.label or 'root'} {status}>"


class StateGroup(list):
    """The children of one fork: a list of States that broadcasts writes.

    ``kids += "text"`` and ``kids.gen(...)`` apply to every child (SGLang's
    ``forks += ...``); everything else is a plain list.
    """

    parent: "State | None" = None  # the forked state (set by `State.fork`)

    def __iadd__(self, other):  # type: ignore[override]
        if callable(other) and not isinstance(other, Appendable):
            for i, s in enumerate(self):  # SGLang's ``forks += lambda i: ...``
                s += other(i)
            return self
        if isinstance(other, (str, GenExpr, Appendable, Expr)):
            for s in self:
                s += other
            return self
        return super().__iadd__(other)

    def join(self, *names: str, mode: str = "gather_variable") -> "State":
        """SGLang's ``forks.join()``: wait for every branch, then queue on the forked
        state ``s[name] = [each branch's capture]`` for ``names`` (default: every
        capture a branch has that the forked state has not). Returns that state."""
        if mode != "gather_variable":
            raise ValueError(f"join(mode={mode!r}): only 'gather_variable' is supported; to append "
                             f"the branches' text use s += \"\".join(k[\"name\"] for k in forks)")
        if self.parent is None:
            raise ValueError("join(): this group did not come from State.fork")
        self.wait()
        if not names:
            have = self.parent.captures
            names = tuple(sorted({k for s in self for k in s._captures if k not in have}))
        for name in names:
            self.parent[name] = [s.get(name) for s in self]
        return self.parent

    def gen(self, name: str, **options: Any) -> "StateGroup":
        """Queue the same generation on every state."""
        for s in self:
            s.gen(name, **options)
        return self

    def wait(self) -> "StateGroup":
        """Run until every state of the group is done."""
        if self:
            self[0]._rt.wait(lambda: all(s.done for s in self))
        return self

    def release(self) -> None:
        """Release every state of the group."""
        for s in self:
            s.release()

    def __getitem__(self, i):
        r = super().__getitem__(i)
        return StateGroup(r) if isinstance(i, slice) else r
