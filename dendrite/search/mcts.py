"""Monte-Carlo tree search over reasoning steps (UCT or PUCT).

One iteration: *select* up to ``parallel`` leaves by UCT/PUCT; *expand* each
into ``width`` children that each sample one step (all batched); *evaluate*
every new child with ``by`` (a callable or a model judge), directly or as the
mean over ``rollouts`` continuations sampled to ``rollout_depth`` more steps
(also batched); *backpropagate* the values to the root. The answer is the
most-visited path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from dendrite.program import program
from dendrite.program.state import State
from dendrite.search.common import CachedScorer, as_batch_step, wait_all


@dataclass(eq=False)
class _Stats:
    parent: "_Stats | None"
    state: State
    depth: int
    prior: float = 1.0
    visits: int = 0
    total: float = 0.0
    value: float | None = None  # the node's own evaluation
    children: list["_Stats"] = field(default_factory=list)
    terminal: bool = False

    @property
    def q(self) -> float:
        return self.total / self.visits if self.visits else 0.0


def _softmax(xs: list[float], temperature: float) -> list[float]:
    if not xs:
        return []
    t = max(temperature, 1e-6)
    m = max(xs)
    es = [math.exp((x - m) / t) for x in xs]
    z = sum(es)
    return [e / z for e in es]


@program
def mcts(
    s: State,
    prompt: str = "",
    iterations: int = 8,
    width: int = 2,
    depth: int = 3,
    step: Any = None,
    by: Any = None,
    c: float = 1.4,
    policy: str = "uct",
    rollouts: int = 0,
    rollout_depth: int | None = None,
    parallel: int = 1,
    prior_temperature: float = 1.0,
    terminal: Callable[[State], bool] | None = None,
    label: str = "node",
) -> State:
    """MCTS with ``policy`` "uct" (Q + c·sqrt(ln N / n)) or "puct"
    (Q + c·P·sqrt(N) / (1 + n), priors P from a softmax over the children's
    step logprobs). ``by`` values a state (default: mean logprob); with
    ``rollouts`` > 0 a new node's value is the mean ``by`` over that many
    sampled continuations of ``rollout_depth`` steps (default: to ``depth``).
    ``terminal(state)`` stops expansion (default: the state generated EOS).
    Returns the end of the most-visited path.
    """
    if policy not in ("uct", "puct"):
        raise ValueError("policy must be 'uct' or 'puct'")
    if prompt:
        s += prompt
    value_of = CachedScorer(by)
    run_step = as_batch_step(step)
    is_terminal = terminal or (lambda st: st.finish_reason == "eos")
    root = _Stats(None, s, 0)

    def ucb(parent: _Stats, ch: _Stats) -> float:
        if policy == "uct":
            if ch.visits == 0:
                return math.inf
            return ch.q + c * math.sqrt(math.log(max(parent.visits, 1)) / ch.visits)
        q = ch.q if ch.visits else parent.q
        return q + c * ch.prior * math.sqrt(max(parent.visits, 1)) / (1 + ch.visits)

    def select_leaf(claimed: set[int]) -> _Stats | None:
        node = root
        while node.children:
            free = [ch for ch in node.children if id(ch) not in claimed]
            if not free:
                claimed.add(id(node))
                return None
            node = max(free, key=lambda ch: (ucb(node, ch), -ch.state.id))
        if id(node) in claimed:
            return None
        claimed.add(id(node))
        return node

    def evaluate(nodes: list[_Stats]) -> None:
        todo = [n for n in nodes if n.value is None]
        if not todo:
            return
        if rollouts <= 0:
            for n, v in zip(todo, value_of.score_all([n.state for n in todo])):
                n.value = v
            return
        sims: list[tuple[_Stats, State]] = []
        for n in todo:
            for r in n.state.fork(rollouts, label="rollout"):
                r.node.info["rollout"] = True
                sims.append((n, r))
        sim_states = [r for _, r in sims]
        budget = [
            rollout_depth if rollout_depth is not None else depth - n.depth for n, _ in sims
        ]
        for d in range(max(budget, default=0)):
            active = [r for (_, r), b in zip(sims, budget) if d < b]
            run_step(active)  # queued only: all rollouts advance batched
        wait_all(sim_states)
        vals = value_of.score_all(sim_states)
        per: dict[int, list[float]] = {}
        for (n, r), v in zip(sims, vals):
            per.setdefault(id(n), []).append(v)
            r.release()
        for n in todo:
            vs = [v for v in per.get(id(n), []) if math.isfinite(v)]
            n.value = sum(vs) / len(vs) if vs else -math.inf

    for _ in range(int(iterations)):
        claimed: set[int] = set()
        leaves = []
        for _ in range(max(1, int(parallel)) * 3):
            if len(leaves) >= max(1, int(parallel)):
                break
            leaf = select_leaf(claimed)
            if leaf is None:
                if id(root) in claimed:
                    break
                continue
            leaves.append(leaf)
        if not leaves:
            break
        # expand
        new: list[_Stats] = []
        for leaf in leaves:
            if leaf.terminal or leaf.depth >= depth:
                continue
            kids = list(leaf.state.fork(width, label=label))
            leaf.state.release()
            leaf.children = [_Stats(leaf, k, leaf.depth + 1) for k in kids]
            new.extend(leaf.children)
        run_step([n.state for n in new])
        wait_all([n.state for n in new])
        for leaf in leaves:
            if leaf.children and policy == "puct":
                base = leaf.state._lp_sum  # logprob total at the fork point
                gains = [ch.state.sum_logprob - base for ch in leaf.children]
                for ch, p in zip(leaf.children, _softmax(gains, prior_temperature)):
                    ch.prior = p
        for n in new:
            n.terminal = bool(is_terminal(n.state))
        # evaluate + backpropagate
        targets = new + [leaf for leaf in leaves if not leaf.children]
        evaluate(targets)
        for n in targets:
            v = n.value if n.value is not None and math.isfinite(n.value) else 0.0
            cur: _Stats | None = n
            while cur is not None:
                cur.visits += 1
                cur.total += v
                cur = cur.parent

    # record and choose
    stack = [root]
    while stack:
        n = stack.pop()
        n.state.node.info.update(visits=n.visits, value=round(n.q, 4))
        if n.parent is not None and policy == "puct":
            n.state.node.info["prior"] = round(n.prior, 4)
        if n.value is not None:
            n.state.score = n.value
        stack.extend(n.children)
    node = root
    node.state.node.selected = True
    while node.children:
        node = max(node.children, key=lambda ch: (ch.visits, ch.q, -ch.state.id))
        node.state.node.selected = True
    return node.state
