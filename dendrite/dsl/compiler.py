"""Compile a parsed .dendrite script into `dendrite.program.Program` objects.

A script runs over a *frontier*: the list of states the next statement applies
to (at first, the program's root state). Statements queue ops on every state
of the frontier through the ordinary State API, so generations of all
branches run batched, exactly like a Python ``@program`` (`dendrite.program.program`):

* ``"text {x}"``        ``s += text`` on every state (``{expr}`` interpolates).
* ``gen x(opts)``       ``s.gen("x", **opts)``; ``x`` becomes a capture.
* ``fork N as g:``      every state forks N children; the body runs on all
                        children; afterwards the frontier is the children.
* ``prune [g] keep K [by e]``  keep the K best states of the frontier.
* ``select [g] by e``   keep the single best state.
* ``select x(choices=[...], method="mean")``  ``s += select("x", ...)``: append
                        the choice the model scores best (``method``: "mean",
                        "sum", or "constrained", which takes gen options).
* ``let x = e`` / ``x = e``   set a value on every state (per-state ``e``).
* ``repeat N:`` / ``for x in list:`` / ``while c max N:``  bounded loops.
* ``if c: ... elif c: ... else: ...``  splits the frontier by ``c``.
* ``search algo(opts) as g [by e]:`` runs a `dendrite.search` algorithm on each
  state; the body is one expansion step.
* ``return e``          last statement; one value per frontier state (a list
                        if several), or one value if ``e`` only aggregates.

Names are resolved at compile time; an undefined name, unknown gen option or
function, or misplaced statement is a `ScriptNameError`/`ScriptSyntaxError`
at its line and column.

At run time every statement runs under ``Runtime.origin(site)``: the ops it
queues remember the statement, so a generation that fails later (when some
other line waits for it), or that is running when the run's step budget is
spent, is reported as a `ScriptRuntimeError` at the statement that queued it.
Limits (`dendrite.dsl.limits`, `dendrite.program`) bound loops, value sizes, fork
counts, live branches and engine steps, so no script runs forever.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

from lark import Token, Tree

from dendrite.program.options import GEN_OPTIONS, SAMPLING_OPTIONS, GenOptionError, check_gen_options
from dendrite.program.program import Param, Program
from dendrite.program.runtime import OP_ERRORS, Runtime, StepBudgetExceeded
from dendrite.program.state import MAX_FORK, State
from . import builtins as B
from .limits import ARITH, MAX_ITERATIONS, MAX_TOTAL_ITERATIONS, check_search_option, power
from .errors import (
    ScriptError,
    ScriptNameError,
    ScriptRuntimeError,
    ScriptSyntaxError,
    did_you_mean,
)
from .strings import StringError, split_string

#: Keywords of `Program.run`, so no script parameter may have these names.
RESERVED_PARAMS = ("seed", "progress", "max_steps", "max_branches")

_COMPARE = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}
_ARITH = ARITH  # size-checked: "x" * 10**12 fails at once instead of eating memory


class _Run:
    """The mutable context of one program invocation."""

    __slots__ = ("args", "frontier", "value", "has_value", "rt", "iterations")

    def __init__(self, args: dict[str, Any], frontier: list[State]):
        self.args = args
        self.frontier = frontier
        self.value: Any = None
        self.has_value = False
        self.rt: Runtime | None = frontier[0].runtime if frontier else None
        self.iterations = 0  # loop iterations so far, all loops together


class _Site:
    """Where a statement is: the origin of the ops it queues (`Runtime.origin`).

    ``wrap`` turns a failure of such an op (or of the statement itself) into
    a `ScriptRuntimeError` at the statement, naming it (``gen 'x': ...``).
    """

    __slots__ = ("compiler", "what", "line", "column")

    def __init__(self, compiler: "Compiler", what: str, line: int, column: int):
        self.compiler, self.what, self.line, self.column = compiler, what, line, column

    def wrap(self, exc: BaseException) -> ScriptError:
        if isinstance(exc, ScriptError):
            return exc
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, StepBudgetExceeded):
            text = f"{type(exc).__name__}: {text}"
        err = self.compiler.error(ScriptRuntimeError, f"{self.what}: {text}", (self.line, self.column))
        err.__cause__ = exc
        return err


Eval = Callable[[_Run, "State | None"], Any]
Exec = Callable[[_Run], None]


@dataclass
class Expr:
    """A compiled expression: ``fn(run, state)``; ``per_state`` if it reads a branch."""

    fn: Eval
    per_state: bool
    line: int
    column: int
    node: Any = None
    constant: bool = False


class _Scope:
    """Names visible at a point of the program, in source order."""

    def __init__(self, params: list[str]):
        self.params = set(params)
        self.values: set[str] = set()  # captures and lets
        self.groups: set[str] = set()
        self.group: str | None = None  # label of the current frontier


def _pos(node: Any) -> tuple[int, int]:
    if isinstance(node, Token):
        return node.line or 1, node.column or 1
    meta = getattr(node, "meta", None)
    if meta is not None and not getattr(meta, "empty", True):
        return meta.line, meta.column
    for c in getattr(node, "children", []):
        if c is not None:
            return _pos(c)
    return 1, 1


class Compiler:
    """Compiles one script (source text + parse tree) into programs."""

    def __init__(self, source: str, filename: str):
        self.source = source
        self.filename = filename

    # ------------------------------------------------------------ errors

    def error(self, cls: type[ScriptError], message: str, where: Any) -> ScriptError:
        """A `cls` error whose message is located at the node/token `where`."""
        line, col = where if isinstance(where, tuple) else _pos(where)
        return cls(message, self.filename, self.source, line, col)

    def _guard(self, e: Expr) -> Eval:
        """Wrap an expression so Python errors become ScriptRuntimeErrors at its spot."""
        fn = e.fn

        def run(r: _Run, s: State | None) -> Any:
            try:
                return fn(r, s)
            except ScriptError:
                raise
            except Exception as ex:  # noqa: BLE001 - re-raised with a position
                raise self.error(ScriptRuntimeError, f"{type(ex).__name__}: {ex}", (e.line, e.column)) from ex

        return run

    # ------------------------------------------------------------ module

    def compile_module(self, tree: Tree) -> dict[str, Program]:
        """Compile every program of a parsed script: ``{name: Program}`` in file order."""
        programs: dict[str, Program] = {}
        for node in tree.children:
            if isinstance(node, Tree) and node.data == "program":
                name_tok = node.children[0]
                if name_tok in programs:
                    raise self.error(ScriptNameError, f"program '{name_tok}' is defined twice", name_tok)
                programs[str(name_tok)] = self.compile_program(node)
        if not programs:
            raise self.error(ScriptSyntaxError, "no 'program name(...):' in script", (1, 1))
        return programs

    def compile_program(self, node: Tree) -> Program:
        """Compile one ``program`` definition into a `Program`."""
        name_tok, params_node, block = node.children
        params: list[Param] = []
        seen: set[str] = set()
        empty = _Scope([])
        for p in params_node.children if params_node is not None else []:
            pname = p.children[0]
            if pname in seen:
                raise self.error(ScriptNameError, f"duplicate parameter '{pname}'", pname)
            if pname in RESERVED_PARAMS:
                raise self.error(
                    ScriptNameError,
                    f"parameter name '{pname}' is reserved (a keyword of Program.run: "
                    f"{', '.join(RESERVED_PARAMS)})",
                    pname,
                )
            seen.add(str(pname))
            if len(p.children) > 1 and p.children[1] is not None:
                dexpr = self.expr(p.children[1], empty)
                default = self._guard(dexpr)(_Run({}, []), None)
                params.append(Param(str(pname), default))
            else:
                if params and not params[-1].required:
                    raise self.error(
                        ScriptSyntaxError, f"parameter '{pname}' without a default follows one with a default", pname
                    )
                params.append(Param(str(pname)))
        scope = _Scope([p.name for p in params])
        stmts = self.block(block, scope, top=True)
        program_name = str(name_tok)

        def fn(s: State, **args: Any) -> Any:
            run = _Run(args, [s])
            for st in stmts:
                st(run)
            return run.value

        fn.__name__ = program_name
        prog = Program(fn, name=program_name, params=params, doc=f"{self.filename}: program {program_name}")
        prog.filename = self.filename  # type: ignore[attr-defined]
        return prog

    # ------------------------------------------------------------ statements

    def block(self, block: Tree, scope: _Scope, top: bool = False, in_search: bool = False) -> list[Exec]:
        """Compile a block's statements, checking which may appear where."""
        stmts = block.children
        out = []
        for i, st in enumerate(stmts):
            if st.data == "return_stmt" and not (top and i == len(stmts) - 1):
                raise self.error(ScriptSyntaxError, "'return' must be the last statement of the program", st)
            if in_search and st.data in ("fork_stmt", "prune_stmt", "select_stmt", "search_stmt", "return_stmt"):
                word = st.data.split("_")[0]
                raise self.error(ScriptSyntaxError, f"'{word}' is not allowed in a search step", st)
            out.append(self._at_site(getattr(self, st.data)(st, scope, in_search), st))
        return out

    def _at_site(self, ex: Exec, node: Tree) -> Exec:
        """Run ``ex`` with its statement as the origin of the ops it queues; an
        op/engine failure inside it (not already located) becomes a located error."""
        site = _Site(self, _describe_stmt(node), *_pos(node))

        def run_at(run: _Run) -> None:
            rt = run.rt
            prev = rt.set_origin(site) if rt is not None else None
            try:
                ex(run)
            except ScriptError:
                raise
            except OP_ERRORS as e:
                raise site.wrap(e) from e
            finally:
                if rt is not None:
                    rt.set_origin(prev)

        return run_at

    def pass_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``pass``: does nothing."""
        return lambda run: None

    def text_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """A string statement: append the (formatted) text to the state."""
        text = self.string(node.children[0], scope)
        ev = self._guard(text)

        def run_text(run: _Run) -> None:
            for s in run.frontier:
                s += ev(run, s)

        return run_text

    def gen_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``gen name(options)``: queue a generation into variable ``name``."""
        name_tok = node.children[0]
        opts_node = node.children[1] if len(node.children) > 1 else None
        name = str(name_tok)
        self._check_definable(name_tok)
        opts = self.options(opts_node, scope, GEN_OPTIONS, "gen option")
        empty = _Run({}, [])
        constant = {k: self._guard(e)(empty, None) for k, (e, _) in opts.items() if e.constant}
        try:
            check_gen_options(constant)
        except GenOptionError as ex:
            raise self.error(ScriptSyntaxError, str(ex), opts[ex.option][1]) from None
        self._check_constraint(constant, opts)
        evs = {k: self._guard(e) for k, (e, _) in opts.items()}
        scope.values.add(name)

        def run_gen(run: _Run) -> None:
            for s in run.frontier:
                kwargs = {k: ev(run, s) for k, ev in evs.items()}
                try:
                    s.gen(name, **kwargs)
                except GenOptionError as ex:  # a per-state option value was bad
                    raise self.error(ScriptRuntimeError, str(ex), opts[ex.option][1]) from ex
                except (TypeError, ValueError) as ex:  # e.g. an invalid per-state regex
                    raise self.error(ScriptRuntimeError, str(ex).splitlines()[0], name_tok) from ex

        return run_gen

    def _check_constraint(self, constant: dict[str, Any], opts: dict[str, Any]) -> None:
        """Validate constant regex/json_schema/grammar/choices now, at their spot."""
        for kind in ("regex", "json_schema", "grammar", "choices"):
            if kind not in constant or constant[kind] is None:
                continue
            try:
                from dendrite.grammar.constraint import Constraint
                from dendrite.grammar.errors import GrammarError
            except ImportError:  # pragma: no cover - grammar module not installed
                return
            try:
                Constraint(**{kind: constant[kind]})
            except (GrammarError, TypeError, ValueError) as ex:
                expr = opts[kind][0]
                where = (expr.line, expr.column)
                detail = getattr(ex, "message", str(ex)).strip().splitlines()
                msg = detail[-1] if detail else str(ex)
                if msg.startswith("error: "):
                    msg = msg[len("error: "):]
                offset = getattr(ex, "offset", None)
                tok = expr.node.children[0] if expr.node is not None and expr.node.data == "string" else None
                if offset is not None and tok is not None and tok.line == tok.end_line:
                    prefix = 1 + (1 if str(tok)[:1] in "rR" else 0)
                    where = (tok.line, tok.column + prefix + offset)
                raise self.error(ScriptSyntaxError, f"invalid {kind}: {msg}", where) from None

    def _check_definable(self, tok: Token) -> None:
        """Names may shadow built-ins (like Python); nothing to reject today."""

    def let_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``let name = expr``: bind a new variable."""
        name_tok, value = node.children
        self._check_definable(name_tok)
        e = self.expr(value, scope)
        scope.values.add(str(name_tok))
        return self._setter(str(name_tok), e)

    def assign_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``name = expr``: rebind a variable (or a parameter)."""
        name_tok, value = node.children
        name = str(name_tok)
        if name not in scope.values and name not in scope.params:
            raise self.error(
                ScriptNameError,
                f"undefined name '{name}' (use 'let {name} = ...' to define it)",
                name_tok,
            )
        self._check_definable(name_tok)
        e = self.expr(value, scope)
        scope.values.add(name)
        return self._setter(name, e)

    def _setter(self, name: str, e: Expr) -> Exec:
        ev = self._guard(e)

        def run_set(run: _Run) -> None:
            if e.per_state:
                for s in run.frontier:
                    s[name] = ev(run, s)
            else:
                v = ev(run, run.frontier[0] if run.frontier else None)
                for s in run.frontier:
                    s[name] = v

        return run_set

    def return_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``return expr``: the program's value."""
        e = self.expr(node.children[0], scope)
        ev = self._guard(e)

        def run_return(run: _Run) -> None:
            fr = run.frontier
            if not e.per_state:
                run.value = ev(run, fr[0] if fr else None)
            elif len(fr) == 1:
                run.value = ev(run, fr[0])
            else:
                run.value = [ev(run, s) for s in fr]
            run.has_value = True

        return run_return

    def _group_check(self, name_tok: Token | None, scope: _Scope) -> None:
        if name_tok is None:
            return
        name = str(name_tok)
        if name == scope.group:
            return
        if name in scope.groups:
            raise self.error(
                ScriptNameError,
                f"'{name}' is not the current fork group (the frontier is '{scope.group}')",
                name_tok,
            )
        raise self.error(
            ScriptNameError,
            f"undefined fork group '{name}'{did_you_mean(name, scope.groups)}",
            name_tok,
        )

    def _state_independent(self, e: Expr, what: str) -> Eval:
        if e.per_state:
            raise self.error(
                ScriptSyntaxError, f"{what} must not depend on a branch's values", (e.line, e.column)
            )
        ev = self._guard(e)
        return lambda run: ev(run, run.frontier[0] if run.frontier else None)

    def _count_iteration(self, run: _Run, where: Any) -> None:
        """Count one loop iteration of the run; past the run's total, a located error."""
        run.iterations += 1
        if run.iterations > MAX_TOTAL_ITERATIONS:
            raise self.error(
                ScriptRuntimeError,
                f"the run's loops passed {MAX_TOTAL_ITERATIONS} iterations in all (the limit)",
                where,
            )

    def _int_bound(self, e: Expr, what: str) -> Callable[[_Run], int]:
        get = self._state_independent(e, what)

        def bound(run: _Run) -> int:
            v = get(run)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise self.error(ScriptRuntimeError, f"{what} must be a non-negative int, got {v!r}", (e.line, e.column))
            if v > MAX_ITERATIONS:
                raise self.error(ScriptRuntimeError, f"{what} {v} exceeds the limit {MAX_ITERATIONS}", (e.line, e.column))
            return v

        return bound

    def prune_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``prune [group] keep k [by scorer]``: keep the best branches."""
        name_tok, keep_node, by_node = node.children
        self._group_check(name_tok, scope)
        keep = self._int_bound(self.expr(keep_node, scope), "keep count")
        scorer = self.scorer(by_node, scope)

        def run_prune(run: _Run) -> None:
            from dendrite.program.select import prune

            run.frontier = list(prune(run.frontier, keep(run), by=scorer(run)))

        return run_prune

    def select_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``select [group] by scorer``: continue with the best branch."""
        name_tok, by_node = node.children
        self._group_check(name_tok, scope)
        scorer = self.scorer(by_node, scope)

        def run_select(run: _Run) -> None:
            from dendrite.program.select import select

            if run.frontier:
                run.frontier = [select(run.frontier, by=scorer(run))]

        return run_select

    def choose_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``select x(choices=[...], method=...)``: capture the best-scored choice as ``x``."""
        from dendrite.program.choice import check_choices, check_method
        from dendrite.program.select import select

        name_tok = node.children[0]
        opts_node = node.children[1] if len(node.children) > 1 else None
        name = str(name_tok)
        self._check_definable(name_tok)
        allowed = ("choices", "method") + SAMPLING_OPTIONS
        opts = self.options(opts_node, scope, allowed, "select option")
        if "choices" not in opts:
            raise self.error(ScriptSyntaxError, f"select {name}(...) needs choices=[...]", name_tok)
        empty = _Run({}, [])
        constant = {k: self._guard(e)(empty, None) for k, (e, _) in opts.items() if e.constant}
        method = constant.get("method", "mean")
        for key, check in (("choices", check_choices), ("method", check_method)):
            if key in constant:
                try:
                    check(constant[key])
                except (TypeError, ValueError) as ex:
                    raise self.error(ScriptSyntaxError, str(ex), opts[key][1]) from None
        gen_opts = [k for k in opts if k in SAMPLING_OPTIONS]
        if gen_opts and "method" in constant and method != "constrained":
            raise self.error(ScriptSyntaxError,
                             f"select option '{gen_opts[0]}' needs method=\"constrained\" "
                             f"(the ranked methods sample nothing)", opts[gen_opts[0]][1])
        evs = {k: self._guard(e) for k, (e, _) in opts.items()}
        scope.values.add(name)

        def run_choose(run: _Run) -> None:
            for s in run.frontier:
                kwargs = {k: ev(run, s) for k, ev in evs.items()}
                choices = kwargs.pop("choices")
                try:
                    s += select(name, choices=choices, **kwargs)
                except GenOptionError as ex:
                    raise self.error(ScriptRuntimeError, str(ex), opts[ex.option][1]) from ex
                except (TypeError, ValueError) as ex:
                    raise self.error(ScriptRuntimeError, str(ex).splitlines()[0], name_tok) from ex

        return run_choose

    def fork_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``fork n as group:``: run the block in n child branches."""
        count_node, name_tok, block = node.children
        label = str(name_tok)
        count = self.expr(count_node, scope)
        cev = self._guard(count)
        scope.groups.add(label)
        scope.group = label
        body = self.block(block, scope)

        where = (count.line, count.column)

        def run_fork(run: _Run) -> None:
            counts = []
            for s in run.frontier:
                n = cev(run, s)
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise self.error(ScriptRuntimeError, f"fork count must be a non-negative int, got {n!r}", where)
                if n > MAX_FORK:
                    raise self.error(
                        ScriptRuntimeError, f"fork count {n} exceeds the limit of {MAX_FORK} children per fork", where
                    )
                counts.append(n)
            self._check_branches(run, counts, where)
            kids: list[State] = []
            for s, n in zip(run.frontier, counts):
                try:
                    kids.extend(s.fork(n, label=label))
                except ValueError as ex:  # the runtime's own limit check (kept in step with ours)
                    raise self.error(ScriptRuntimeError, str(ex), where) from ex
                s.release()  # superseded by its children, which keep the shared KV
            run.frontier = kids
            for st in body:
                st(run)

        return run_fork

    def _check_branches(self, run: _Run, counts: list[int], where: tuple[int, int]) -> None:
        """Refuse, before any fork, a fork statement that would pass the run's
        live-branch limit at some point (forks and releases go parent by parent)."""
        rt = run.rt
        if rt is None:
            return
        live = peak = rt.live_branches
        for s, n in zip(run.frontier, counts):
            live += n - (1 if s._leaf else 0)  # the parent stops being a leaf (forked or released)
            peak = max(peak, live + (1 if s._leaf and n == 0 else 0))
        if peak > rt.max_branches:
            raise self.error(
                ScriptRuntimeError,
                f"fork of {sum(counts)} branches would make {peak} live branches, over this run's "
                f"limit of max_branches={rt.max_branches}",
                where,
            )

    def repeat_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``repeat n:``: run the block n times (bounded)."""
        count_node, block = node.children
        count = self._int_bound(self.expr(count_node, scope), "repeat count")
        body = self.block(block, scope, in_search=in_search)

        def run_repeat(run: _Run) -> None:
            for _ in range(count(run)):
                self._count_iteration(run, node)
                for st in body:
                    st(run)

        return run_repeat

    def for_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``for x in expr:``: run the block per item (bounded)."""
        name_tok, iter_node, block = node.children
        self._check_definable(name_tok)
        it = self.expr(iter_node, scope)
        get = self._state_independent(it, "the loop's list")
        name = str(name_tok)
        scope.values.add(name)
        body = self.block(block, scope, in_search=in_search)

        def run_for(run: _Run) -> None:
            items = get(run)
            if isinstance(items, (str, dict)) or not hasattr(items, "__len__"):
                items = list(items) if isinstance(items, (str, dict)) else items
            try:
                n = len(items)
            except TypeError:
                raise self.error(ScriptRuntimeError, f"cannot loop over {type(items).__name__}", (it.line, it.column)) from None
            if n > MAX_ITERATIONS:
                raise self.error(ScriptRuntimeError, f"loop over {n} items exceeds the limit {MAX_ITERATIONS}", (it.line, it.column))
            for v in list(items):
                self._count_iteration(run, node)
                for s in run.frontier:
                    s[name] = v
                for st in body:
                    st(run)

        return run_for

    def while_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``while cond:``: run the block while the condition holds (bounded)."""
        cond_node, max_node, block = node.children
        cond = self._guard(self.expr(cond_node, scope))
        bound = self._int_bound(self.expr(max_node, scope), "while bound")
        body = self.block(block, scope, in_search=in_search)

        def run_while(run: _Run) -> None:
            for _ in range(bound(run)):
                active = [s for s in run.frontier if cond(run, s)]
                if not active:
                    break
                rest = [s for s in run.frontier if s not in active]
                self._count_iteration(run, node)
                run.frontier = active
                for st in body:
                    st(run)
                run.frontier = rest + run.frontier

        return run_while

    def if_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``if``/``elif``/``else``."""
        cond_node, then_block, *rest = node.children
        branches = [(self._guard(self.expr(cond_node, scope)), self.block(then_block, scope, in_search=in_search))]
        else_body: list[Exec] | None = None
        for clause in rest:
            if clause is None:
                continue
            if clause.data == "elif_clause":
                c, b = clause.children
                branches.append((self._guard(self.expr(c, scope)), self.block(b, scope, in_search=in_search)))
            else:
                else_body = self.block(clause.children[0], scope, in_search=in_search)

        def run_if(run: _Run) -> None:
            remaining = list(run.frontier)
            result: list[State] = []
            for cond, body in branches:
                take = [s for s in remaining if cond(run, s)]
                remaining = [s for s in remaining if s not in take]
                if take:
                    run.frontier = take
                    for st in body:
                        st(run)
                    result.extend(run.frontier)
            if else_body is not None and remaining:
                run.frontier = remaining
                for st in else_body:
                    st(run)
                result.extend(run.frontier)
            elif remaining:
                result.extend(remaining)
            run.frontier = result

        return run_if

    def search_stmt(self, node: Tree, scope: _Scope, in_search: bool) -> Exec:
        """``search NAME(options) as x [by scorer]:``: run a library search (`dendrite.search.ALGORITHMS`)."""
        children = list(node.children)
        if len(children) == 4:  # no "(...)" after the algorithm name
            children.insert(1, None)
        algo_tok, opts_node, name_tok, by_node, block = children
        from dendrite import search as S

        algo = S.ALGORITHMS.get(str(algo_tok))
        if algo is None:
            raise self.error(
                ScriptNameError,
                f"unknown search '{algo_tok}'{did_you_mean(str(algo_tok), S.ALGORITHMS)}"
                f" (known: {', '.join(sorted(S.ALGORITHMS))})",
                algo_tok,
            )
        # callables (step, by, goal...) come from the block and the by clause
        hidden = ("step", "by", "label", "prompt", "done", "goal", "terminal")
        allowed = [p.name for p in algo.params if p.name not in hidden]
        opts = self.options(opts_node, scope, allowed, f"option of search {algo_tok}")
        for k, (e, tok) in opts.items():
            if e.per_state:
                raise self.error(ScriptSyntaxError, f"search option '{k}' must not depend on a branch's values", tok)
            if e.constant:
                why = self._search_option_error(k, e, _Run({}, []))
                if why:
                    raise self.error(ScriptSyntaxError, why, tok)
        label = str(name_tok)
        scorer = self.scorer(by_node, scope) if by_node is not None else None
        scope.groups.add(label)
        body = self.block(block, scope, in_search=True)
        scope.group = label
        evs = {k: self._guard(e) for k, (e, _) in opts.items()}

        def run_search(run: _Run) -> None:
            def step(states: list[State]) -> None:
                saved = run.frontier
                run.frontier = list(states)
                try:
                    for st in body:
                        st(run)
                finally:
                    run.frontier = saved

            step.batched = True  # type: ignore[attr-defined]
            kwargs = {k: ev(run, None) for k, ev in evs.items()}
            for k, v in kwargs.items():
                why = check_search_option(k, v)
                if why:
                    raise self.error(ScriptRuntimeError, why, opts[k][1])
            if scorer is not None:
                kwargs["by"] = scorer(run)
            run.frontier = [algo(s, step=step, label=label, **kwargs) for s in run.frontier]

        return run_search

    def _search_option_error(self, name: str, e: Expr, run: _Run) -> str | None:
        return check_search_option(name, self._guard(e)(run, None))

    # ------------------------------------------------------------ pieces

    def options(self, node: Tree | None, scope: _Scope, allowed, what: str) -> dict[str, tuple[Expr, Token]]:
        """Compile ``(key=value, ...)`` options, rejecting keys not in `allowed`."""
        out: dict[str, tuple[Expr, Token]] = {}
        for opt in node.children if node is not None else []:
            name_tok, value = opt.children
            name = str(name_tok)
            if name not in allowed:
                raise self.error(ScriptNameError, f"unknown {what} '{name}'{did_you_mean(name, allowed)}", name_tok)
            if name in out:
                raise self.error(ScriptSyntaxError, f"{what} '{name}' given twice", name_tok)
            out[name] = (self.expr(value, scope), name_tok)
        return out

    def scorer(self, node: Any, scope: _Scope) -> Callable[[_Run], Any]:
        """Compile a ``by`` clause to a factory of scorers (default: logprob)."""
        from dendrite.program import score as SC

        if node is None:
            return lambda run: SC.logprob
        if isinstance(node, Tree) and node.data == "call" and str(node.children[0]) == "judge":
            args, kwargs = self.call_args(node.children[1], scope)
            if not args:
                raise self.error(ScriptSyntaxError, "judge() needs a prompt template", node)
            allowed = ("regex", "max_tokens", "temperature", "context")
            for k, (e, tok) in kwargs.items():
                if k not in allowed:
                    raise self.error(ScriptNameError, f"unknown judge option '{k}'{did_you_mean(k, allowed)}", tok)
            t = args[0]
            if not (isinstance(t.node, Tree) and t.node.data == "string"):
                raise self.error(ScriptSyntaxError, "judge() template must be a string literal", (t.line, t.column))
            tev = self._guard(t)  # interpolated per state, names checked here
            kev = {k: self._guard(e) for k, (e, _) in kwargs.items()}

            def judge_factory(run: _Run):
                return SC.judge(lambda s: tev(run, s), **{k: ev(run, None) for k, ev in kev.items()})

            return judge_factory
        e = self.expr(node, scope)
        ev = self._guard(e)

        def factory(run: _Run):
            def by(s: State) -> float:
                return ev(run, s)

            by.__name__ = "by"
            return by

        return factory

    def string(self, node: Tree, scope: _Scope) -> Expr:
        """Compile a string literal with its ``{expr}`` fields."""
        tok = node.children[0]
        line, col = tok.line, tok.column
        try:
            pieces = split_string(str(tok), line, col)
        except StringError as ex:
            raise self.error(ScriptSyntaxError, str(ex), (ex.line, ex.column)) from None
        parts: list[Any] = []
        per_state = False
        for p in pieces:
            if p.expr is None:
                parts.append(p.text)
            else:
                e = self.sub_expr(p.expr, p.line, p.column, scope)
                per_state = per_state or e.per_state
                parts.append(self._guard(e))
        if all(isinstance(p, str) for p in parts):
            value = "".join(parts)
            return Expr(lambda r, s: value, False, line, col, node, constant=True)

        def render(r: _Run, s: State | None) -> str:
            return "".join(p if isinstance(p, str) else _fmt(p(r, s)) for p in parts)

        return Expr(render, per_state, line, col, node)

    def sub_expr(self, src: str, line: int, column: int, scope: _Scope) -> Expr:
        """Parse and compile an interpolated ``{expr}`` located at line:column."""
        from .parser import parse_expression

        tree = parse_expression(src, self.filename, self.source, line, column)
        return self.expr(tree, scope)

    # ------------------------------------------------------------ expressions

    def expr(self, node: Any, scope: _Scope) -> Expr:
        """Compile an expression node (dispatch on its rule name)."""
        if isinstance(node, Token):  # bare tokens do not occur; be safe
            raise self.error(ScriptSyntaxError, f"unexpected {node!r}", node)
        line, col = _pos(node)
        kind = node.data
        method = getattr(self, "x_" + kind, None)
        if method is None:  # pragma: no cover - grammar and compiler out of sync
            raise self.error(ScriptSyntaxError, f"unsupported expression '{kind}'", node)
        e = method(node, scope)
        e.line, e.column, e.node = line, col, node
        return e

    def x_number(self, node: Tree, scope: _Scope) -> Expr:
        """A number literal."""
        t = str(node.children[0])
        try:
            v: Any = float(t) if any(c in t for c in ".eE") else int(t)
        except ValueError:  # more digits than Python converts (4300)
            raise self.error(ScriptSyntaxError, f"number too long ({len(t)} digits)", node) from None
        return Expr(lambda r, s: v, False, 0, 0, constant=True)

    def x_string(self, node: Tree, scope: _Scope) -> Expr:
        """A string expression."""
        return self.string(node, scope)

    def x_true(self, node: Tree, scope: _Scope) -> Expr:
        """``true``."""
        return Expr(lambda r, s: True, False, 0, 0, constant=True)

    def x_false(self, node: Tree, scope: _Scope) -> Expr:
        """``false``."""
        return Expr(lambda r, s: False, False, 0, 0, constant=True)

    def x_none(self, node: Tree, scope: _Scope) -> Expr:
        """``none``."""
        return Expr(lambda r, s: None, False, 0, 0, constant=True)

    def x_list(self, node: Tree, scope: _Scope) -> Expr:
        """A list display ``[a, b, ...]``."""
        items = [self.expr(c, scope) for c in (node.children[0].children if node.children[0] is not None else [])]
        fns = [i.fn for i in items]
        const = all(i.constant for i in items)
        if const:
            try:
                v = [f(None, None) for f in fns]
            except Exception:  # noqa: BLE001 - left to fail at run time, located by _guard
                const = False
            else:
                return Expr(lambda r, s: list(v), False, 0, 0, constant=True)
        return Expr(lambda r, s: [f(r, s) for f in fns], any(i.per_state for i in items), 0, 0)

    def x_dict(self, node: Tree, scope: _Scope) -> Expr:
        """A dict display ``{k: v, ...}``."""
        pairs = []
        for pair in node.children[0].children if node.children[0] is not None else []:
            pairs.append((self.expr(pair.children[0], scope), self.expr(pair.children[1], scope)))
        const = all(k.constant and v.constant for k, v in pairs)
        fns = [(k.fn, v.fn) for k, v in pairs]
        if const:
            try:
                d = {k(None, None): v(None, None) for k, v in fns}
            except Exception:  # noqa: BLE001 - left to fail at run time, located by _guard
                const = False
            else:
                return Expr(lambda r, s: dict(d), False, 0, 0, constant=True)
        per = any(k.per_state or v.per_state for k, v in pairs)
        return Expr(lambda r, s: {k(r, s): v(r, s) for k, v in fns}, per, 0, 0)

    def x_var(self, node: Tree, scope: _Scope) -> Expr:
        """A variable reference (resolved now: unknown names are compile errors)."""
        tok = node.children[0]
        name = str(tok)
        if name in scope.values:
            def get_capture(r: _Run, s: State | None) -> Any:
                if s is None:
                    raise NameError(f"'{name}' needs a branch, but the frontier is empty")
                return s[name]

            return Expr(get_capture, True, 0, 0)
        if name in scope.params:
            return Expr(lambda r, s: r.args[name], False, 0, 0)
        if name in B.STATE_NAMES:
            getter = B.STATE_NAMES[name]

            def get_state(r: _Run, s: State | None) -> Any:
                if s is None:
                    raise NameError(f"'{name}' needs a branch, but the frontier is empty")
                return getter(s)

            return Expr(get_state, True, 0, 0)
        known = scope.values | scope.params | set(B.STATE_NAMES)
        if name in B.FUNCTIONS or name in B.AGGREGATES:
            raise self.error(ScriptNameError, f"'{name}' is a function; call it as {name}(...)", tok)
        raise self.error(ScriptNameError, f"undefined name '{name}'{did_you_mean(name, known)}", tok)

    def call_args(self, node: Tree | None, scope: _Scope) -> tuple[list[Expr], dict[str, tuple[Expr, Token]]]:
        """Compile a call's positional and keyword arguments."""
        args: list[Expr] = []
        kwargs: dict[str, tuple[Expr, Token]] = {}
        for a in node.children if node is not None else []:
            if isinstance(a, Tree) and a.data == "kwarg":
                k = a.children[0]
                if str(k) in kwargs:
                    raise self.error(ScriptSyntaxError, f"argument '{k}' given twice", k)
                kwargs[str(k)] = (self.expr(a.children[1], scope), k)
            else:
                if kwargs:
                    raise self.error(ScriptSyntaxError, "positional argument after a keyword argument", a)
                args.append(self.expr(a, scope))
        return args, kwargs

    def x_call(self, node: Tree, scope: _Scope) -> Expr:
        """A call of a builtin function."""
        name_tok, args_node = node.children
        name = str(name_tok)
        if name in B.SCORER_FUNCTIONS:
            raise self.error(ScriptSyntaxError, f"{name}() can only be used after 'by'", name_tok)
        args, kwargs = self.call_args(args_node, scope)
        afns = [a.fn for a in args]
        kfns = {k: e.fn for k, (e, _) in kwargs.items()}
        if name in B.AGGREGATES:
            if len(args) != 1 or kwargs:
                raise self.error(ScriptSyntaxError, f"{name}() takes one expression", name_tok)
            agg = B.AGGREGATES[name]
            inner = afns[0]

            def aggregate(r: _Run, s: State | None) -> Any:
                return agg([inner(r, x) for x in r.frontier])

            return Expr(aggregate, False, 0, 0)
        fn = B.FUNCTIONS.get(name)
        if fn is None:
            known = list(B.FUNCTIONS) + list(B.AGGREGATES) + list(B.SCORER_FUNCTIONS)
            raise self.error(ScriptNameError, f"unknown function '{name}'{did_you_mean(name, known)}", name_tok)
        per = any(a.per_state for a in args) or any(e.per_state for e, _ in kwargs.values())
        return Expr(lambda r, s: fn(*[f(r, s) for f in afns], **{k: f(r, s) for k, f in kfns.items()}), per, 0, 0)

    def x_index(self, node: Tree, scope: _Scope) -> Expr:
        """``a[i]``."""
        a, b = (self.expr(c, scope) for c in node.children)
        fa, fb = a.fn, b.fn
        return Expr(lambda r, s: fa(r, s)[fb(r, s)], a.per_state or b.per_state, 0, 0)

    def x_neg(self, node: Tree, scope: _Scope) -> Expr:
        """``-a``."""
        a = self.expr(node.children[0], scope)
        f = a.fn
        return Expr(lambda r, s: -f(r, s), a.per_state, 0, 0, constant=a.constant)

    def x_pos(self, node: Tree, scope: _Scope) -> Expr:
        """``+a``."""
        a = self.expr(node.children[0], scope)
        f = a.fn
        return Expr(lambda r, s: +f(r, s), a.per_state, 0, 0, constant=a.constant)

    def x_not_op(self, node: Tree, scope: _Scope) -> Expr:
        """``not a``."""
        a = self.expr(node.children[0], scope)
        f = a.fn
        return Expr(lambda r, s: not f(r, s), a.per_state, 0, 0, constant=a.constant)

    def x_power(self, node: Tree, scope: _Scope) -> Expr:
        """``a ** b`` (result size bounded)."""
        a, b = (self.expr(c, scope) for c in node.children)
        fa, fb = a.fn, b.fn
        return Expr(lambda r, s: power(fa(r, s), fb(r, s)), a.per_state or b.per_state, 0, 0,
                    constant=a.constant and b.constant)

    def _binary_chain(self, node: Tree, scope: _Scope, table: dict[str, Callable]) -> Expr:
        items = node.children
        first = self.expr(items[0], scope)
        ops = []
        per, const = first.per_state, first.constant
        for i in range(1, len(items), 2):
            op_tok = "".join(str(t) for t in items[i].children)
            rhs = self.expr(items[i + 1], scope)
            ops.append((table[op_tok], rhs.fn))
            per, const = per or rhs.per_state, const and rhs.constant
        f0 = first.fn

        def chain(r: _Run, s: State | None) -> Any:
            v = f0(r, s)
            for op, f in ops:
                v = op(v, f(r, s))
            return v

        return Expr(chain, per, 0, 0, constant=const)

    def x_sum(self, node: Tree, scope: _Scope) -> Expr:
        """``a + b`` / ``a - b`` chains (sizes bounded)."""
        return self._binary_chain(node, scope, _ARITH)

    def x_product(self, node: Tree, scope: _Scope) -> Expr:
        """``a * b`` / ``a / b`` / ``a // b`` / ``a % b`` chains (sizes bounded)."""
        return self._binary_chain(node, scope, _ARITH)

    def x_comparison(self, node: Tree, scope: _Scope) -> Expr:
        """Comparison chains (``a < b <= c``, ``==``, ``!=``, ``in``, ``not in``)."""
        items = node.children
        exprs = [self.expr(items[i], scope) for i in range(0, len(items), 2)]
        ops = [_COMPARE["".join(str(t) for t in items[i].children)] for i in range(1, len(items), 2)]
        fns = [e.fn for e in exprs]

        def compare(r: _Run, s: State | None) -> bool:
            left = fns[0](r, s)
            for op, f in zip(ops, fns[1:]):
                right = f(r, s)
                if not op(left, right):
                    return False
                left = right
            return True

        return Expr(compare, any(e.per_state for e in exprs), 0, 0, constant=all(e.constant for e in exprs))

    def x_and_expr(self, node: Tree, scope: _Scope) -> Expr:
        """``a and b`` (short-circuit)."""
        exprs = [self.expr(c, scope) for c in node.children]
        fns = [e.fn for e in exprs]

        def and_(r: _Run, s: State | None) -> Any:
            v: Any = True
            for f in fns:
                v = f(r, s)
                if not v:
                    return v
            return v

        return Expr(and_, any(e.per_state for e in exprs), 0, 0, constant=all(e.constant for e in exprs))

    def x_or_expr(self, node: Tree, scope: _Scope) -> Expr:
        """``a or b`` (short-circuit)."""
        exprs = [self.expr(c, scope) for c in node.children]
        fns = [e.fn for e in exprs]

        def or_(r: _Run, s: State | None) -> Any:
            v: Any = False
            for f in fns:
                v = f(r, s)
                if v:
                    return v
            return v

        return Expr(or_, any(e.per_state for e in exprs), 0, 0, constant=all(e.constant for e in exprs))


def _describe_stmt(node: Tree) -> str:
    """How an error names a statement: ``gen 'x'``, ``fork``, ``search mcts``..."""
    kind = node.data[: -len("_stmt")] if node.data.endswith("_stmt") else node.data
    if kind == "gen":
        return f"gen '{node.children[0]}'"
    if kind == "search":
        return f"search {node.children[0]}"
    if kind in ("let", "assign"):
        return f"{'let ' if kind == 'let' else ''}{node.children[0]} = ..."
    if kind == "text":
        return "prompt text"
    return kind


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
