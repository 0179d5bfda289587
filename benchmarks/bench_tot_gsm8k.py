"""SGLang's tree-of-thought GSM8K benchmarks on Dendrite, with HF transformers beside.

Workloads (the prompts, branching, temperatures and answer rule of SGLang's
benchmark/tree_of_thought_v0 and benchmark/tree_of_thought_deep, Apache-2.0):

  v0    3 chat turns (plan, execute, reflect-and-score), every state forks 3
        at each turn: 3 + 9 + 27 = 39 generations per question, max_tokens
        256, temperature 0.3. The answer is the majority of the last integer
        of the 9 "answer" (execute) generations; the 27 scores are workload
        only (SGLang votes over ``s["answer"]`` of the joined forks).
  deep  4 turns (plan, execute, reflect, final answer), fork 2 each:
        2 + 4 + 8 + 16 = 30 generations, temperature 0.001; majority of the
        last integer of the full text of each of the 16 leaves.

Accuracy as SGLang computes it: commas dropped, the last run of digits, a
text without digits votes "invalid"; ties go to the value seen first; exact
match with the integer after '####' of the GSM8K answer.

Systems (one process, same model dir, same dtype, same token ids):

  Dendrite       `dendrite.search.tot_frontier` (every level queued at once,
                 each chat turn appended before its fork so children share
                 its KV; no barrier between levels), questions run
                 concurrently through `Program.run_batch`; a row at in-flight
                 N runs max(N, --num-questions) questions in batches of N.
  HF naive       every tree node calls `generate()` on its whole context
                 (re-prefilled each time), one node at a time.
  HF strong      per level, every parent's context is prefilled once (left
                 padded, all in-flight questions together), its DynamicCache
                 repeated with `batch_repeat_interleave(width)`, and all
                 children sampled by one batched `generate()` from that cache.
  Dendrite (HF's settings)  the Dendrite run on exactly the HF rows' questions,
                 max_tokens and in-flight, so "vs Dendrite" compares like with like.

Timing: wall clock around each row (CUDA synchronised), after a warm-up
question for each system; the prefix cache is cleared between rows (within
a row it shares the system prompt across questions, as SGLang's radix cache
would). Tokens are generated tokens (EOS not counted); gen tokens/s = tokens /
wall. Writes --out (JSON, after every row) and a .md table beside it.

    python benchmarks/bench_tot_gsm8k.py --model DIR --out tot.json
    python benchmarks/bench_tot_gsm8k.py --model tiny --device cpu --quick --out /tmp/tot.json
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import bench_common as bc
import torch

DATA = bc.HERE / "data" / "gsm8k_test_200.jsonl"
INVALID = -9999999  # SGLang's marker for "no number"; it takes part in the vote

PLAN = (
    "Please generate a high-level plan for solving the following question. As the first step, "
    "just say what method and idea you will use to solve the question. You can reorganize the "
    "information in the question. Do not do the actual calculation. Keep your response concise "
    "and within 80 words. Question: "
)
EXECUTE = (
    "The plan looks good! Now, use real numbers and do the calculation. Please solve the question "
    "step-by-step according to the high-level plan. Give me the final answer. Make your response "
    "short."
)
REFLECT_V0 = (
    "Okay. Now you evaluate your own solution and give it a score on a scale of 1 to 5. Please do "
    "rigorous check of the correctness."
)
REFLECT_DEEP = (
    "Okay. Now, evaluate your own solution and give it a score on a scale of 1 to 5. Please do "
    "rigorous check of the correctness."
)
FINAL = (
    "Based on your reflection, do you change your mind? Now, give me the final answer after "
    "careful consideration."
)


@dataclass(frozen=True)
class Workload:
    """One SGLang ToT benchmark: a user turn and a generation per level."""

    key: str
    name: str
    width: int
    temperature: float
    turns: tuple[str, ...]  # turns[0] is followed by the question
    names: tuple[str, ...]  # capture name of each level's generation
    vote_capture: str | None  # vote over that level's captures; None = leaves' full text

    @property
    def depth(self) -> int:
        return len(self.turns)

    @property
    def gen_calls(self) -> int:
        return sum(self.width ** (i + 1) for i in range(self.depth))

    def user_turns(self, question: str) -> list[str]:
        return [self.turns[0] + question, *self.turns[1:]]


WORKLOADS = {
    "v0": Workload("v0", "tree_of_thought_v0", 3, 0.3, (PLAN, EXECUTE, REFLECT_V0),
                   ("plan", "answer", "score"), "answer"),
    "deep": Workload("deep", "tree_of_thought_deep", 2, 0.001,
                     (PLAN, EXECUTE, REFLECT_DEEP, FINAL),
                     ("plan", "answer", "score", "final_answer"), None),
}


# -- answers ---------------------------------------------------------------------------


def answer_value(text: str) -> int:
    """SGLang's get_answer_value: the last run of digits (commas dropped), else INVALID."""
    found = re.findall(r"\d+", str(text).replace(",", ""))
    return int(found[-1]) if found else INVALID


def majority(values: Sequence[int]) -> int | None:
    """SGLang's most_frequent_number: the most common value, ties to the first seen."""
    if not values:
        return None
    counts = Counter(values)
    return max(counts, key=counts.get)


def gsm8k_label(answer: str) -> int:
    """The integer after '####' of a GSM8K answer."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}")
    return int(answer.split("####")[-1].strip().replace(",", ""))


def load_questions(path: Path, n: int) -> tuple[list[str], list[int]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if n > len(lines):
        raise SystemExit(f"--num-questions {n}: {path} has only {len(lines)} questions")
    return [x["question"] for x in lines[:n]], [gsm8k_label(x["answer"]) for x in lines[:n]]


def score(preds: Sequence[int | None], labels: Sequence[int]) -> dict[str, Any]:
    n = len(preds)
    return {
        "accuracy": sum(p == y for p, y in zip(preds, labels)) / n if n else None,
        "invalid": sum(p == INVALID for p in preds) / n if n else None,
        "correct": sum(p == y for p, y in zip(preds, labels)),
    }


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


# -- Dendrite --------------------------------------------------------------------------


def make_program():
    """The per-question program: `tot_frontier` over the workload's chat turns."""
    import dendrite.program as dp
    from dendrite.search import tot_frontier

    def step(name: str, max_tokens: int, temperature: float, end: str):
        def run(s) -> None:
            s.gen(name, max_tokens=max_tokens, temperature=temperature)
            s += end  # close the assistant turn (the EOS is not in the context)

        run.__name__ = f"gen_{name}"
        return run

    @dp.program
    def tot_gsm8k(s, question: str, wl: Workload, chat: bc.ChatTurns, max_tokens: int):
        turns = wl.user_turns(question)
        leaves = tot_frontier(
            s, width=wl.width, depth=wl.depth, label="turn",
            level_prompts=[chat.first(turns[0])] + [chat.turn(t) for t in turns[1:]],
            step=[step(n, max_tokens, wl.temperature, chat.end) for n in wl.names],
        )
        if wl.vote_capture is None:
            return [leaf.text for leaf in leaves]
        up = wl.depth - 1 - wl.names.index(wl.vote_capture)
        voters: dict[int, Any] = {}
        for leaf in leaves:
            st = leaf
            for _ in range(up):
                st = st.parent
            voters.setdefault(st.id, st)
        return [st[wl.vote_capture] for st in voters.values()]

    return tot_gsm8k


def finish_counts(tree) -> dict[str, int]:
    c: Counter = Counter()
    for node in tree:
        for seg in node.segments:
            if seg.kind == "gen":
                c[seg.finish_reason] += 1
    return dict(c)


def run_dendrite(engine, prog, wl: Workload, chat: bc.ChatTurns, questions: list[str],
                 labels: list[int], max_tokens: int, in_flight: int, seed: int,
                 budget: bc.Budget, device: torch.device) -> dict[str, Any]:
    if engine.cache is not None:
        engine.cache.clear()  # no row reuses another row's prompts
    preds, gen_tokens, steps, gens, fin, chunk_s = [], 0, 0, 0, Counter(), []
    bc.sync(device)
    t0 = time.perf_counter()
    for part in chunks(len(questions), in_flight):
        if preds and not budget.allows():
            break
        batch = [dict(question=questions[i], wl=wl, chat=chat, max_tokens=max_tokens) for i in part]
        t1 = time.perf_counter()
        res = prog.run_batch(engine, batch, seed=seed + part.start)
        bc.sync(device)
        chunk_s.append(time.perf_counter() - t1)
        for r in res:
            preds.append(majority([answer_value(t) for t in r.value]))
        gen_tokens += res[0].gen_tokens
        steps += res[0].steps
        gens += len(res[0].tree) - len(res[0].tree.roots)
        fin.update(finish_counts(res[0].tree))
    bc.sync(device)
    wall = time.perf_counter() - t0
    n = len(preds)
    return {
        "system": "Dendrite", "workload": wl.key, "questions": n, "in_flight": in_flight,
        "max_tokens": max_tokens, "temperature": wl.temperature, "wall_s": wall,
        "s_per_question": wall / n, "gen_tokens": gen_tokens, "tok_per_s": gen_tokens / wall,
        "gen_calls": gens, "gen_calls_expected": wl.gen_calls * n, "engine_steps": steps,
        "finish": dict(fin), "preds": preds, **score(preds, labels[:n]),
        "partial": n < len(questions), "chunk_s": chunk_s,
    }


# -- HF transformers -------------------------------------------------------------------


class OutOfBudget(Exception):
    """The --budget ran out inside an HF question (it is dropped, not half-counted)."""


@dataclass
class HFNode:
    ids: list[int]
    caps: dict[str, str]
    parent: "HFNode | None" = None


class HFToT:
    """The same tree, token for token, on HF transformers (naive and strong)."""

    def __init__(self, model, tokenizer, chat: bc.ChatTurns, device: torch.device,
                 budget: bc.Budget | None = None):
        self.model, self.tok, self.chat, self.device = model, tokenizer, chat, device
        self.budget = budget or bc.Budget(None)
        self.eos = sorted(tokenizer.eos_token_ids)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.gen_tokens = 0
        self.finish: Counter = Counter()

    def enc(self, text: str, first: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=first) if text else []

    def config(self, max_tokens: int, temperature: float):
        import transformers

        sample = temperature > 0
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else \
            dict(do_sample=False)
        return transformers.GenerationConfig(max_new_tokens=max_tokens, eos_token_id=self.eos or None,
                                             pad_token_id=self.pad, **kw)

    def cut(self, toks: list[int], max_tokens: int) -> list[int]:
        """Generated ids up to (not including) the first EOS; counts tokens and finishes."""
        for i, t in enumerate(toks):
            if t in self.eos:
                self.finish["eos"] += 1
                self.gen_tokens += i
                return toks[:i]
        toks = toks[:max_tokens]
        self.finish["length"] += 1
        self.gen_tokens += len(toks)
        return toks

    def child(self, parent: HFNode, ctx: list[int], gen: list[int], name: str) -> HFNode:
        caps = {**parent.caps, name: self.tok.decode(gen, skip_special_tokens=True)}
        return HFNode(ctx + gen + self.enc(self.chat.end), caps, parent)

    def contexts(self, wl: Workload, question: str, level: int, frontier: list[HFNode]):
        if level == 0:
            return [self.enc(self.chat.first(wl.user_turns(question)[0]), first=True)]
        turn = self.enc(self.chat.turn(wl.turns[level]))
        return [n.ids + turn for n in frontier]

    # naive: one generate() per node over its whole context
    def naive(self, wl: Workload, question: str, max_tokens: int, seed: int) -> list[HFNode]:
        gc_ = self.config(max_tokens, wl.temperature)
        frontier = [HFNode([], {})]
        torch.manual_seed(seed)
        for level, name in enumerate(wl.names):
            kids = []
            for node, ctx in zip(frontier, self.contexts(wl, question, level, frontier)):
                x = torch.tensor([ctx], device=self.device)
                for _ in range(wl.width):
                    if not self.budget.allows():
                        raise OutOfBudget()
                    with torch.no_grad():
                        out = self.model.generate(x, attention_mask=torch.ones_like(x),
                                                  generation_config=gc_)
                    gen = self.cut(out[0, len(ctx):].tolist(), max_tokens)
                    kids.append(self.child(node, ctx, gen, name))
            frontier = kids
        return frontier

    # strong: per level, prefill each parent once, repeat its cache, one batched generate
    def strong(self, wl: Workload, questions: list[str], max_tokens: int,
               seed: int) -> list[list[HFNode]]:
        gc_ = self.config(max_tokens, wl.temperature)
        fronts = [[HFNode([], {})] for _ in questions]
        torch.manual_seed(seed)
        for level, name in enumerate(wl.names):
            if not self.budget.allows():
                raise OutOfBudget()
            rows = [(qi, node, ctx) for qi, (q, fr) in enumerate(zip(questions, fronts))
                    for node, ctx in zip(fr, self.contexts(wl, q, level, fr))]
            gens, _ = bc.hf_fork_generate(self.model, [ctx for _, _, ctx in rows], wl.width,
                                       gc_, self.pad, self.device)
            fronts = [[] for _ in questions]
            for r, (qi, node, ctx) in enumerate(rows):
                for j in range(wl.width):
                    gen = self.cut(gens[r * wl.width + j], max_tokens)
                    fronts[qi].append(self.child(node, ctx, gen, name))
        return fronts

    def votes(self, wl: Workload, leaves: list[HFNode]) -> list[str]:
        if wl.vote_capture is None:
            return [self.tok.decode(n.ids, skip_special_tokens=False) for n in leaves]
        up = wl.depth - 1 - wl.names.index(wl.vote_capture)
        voters: dict[int, HFNode] = {}
        for leaf in leaves:
            n = leaf
            for _ in range(up):
                n = n.parent
            voters.setdefault(id(n), n)
        return [n.caps[wl.vote_capture] for n in voters.values()]


def run_hf(hf: HFToT, mode: str, wl: Workload, questions: list[str], labels: list[int],
           max_tokens: int, in_flight: int, seed: int, budget: bc.Budget,
           device: torch.device) -> dict[str, Any]:
    hf.gen_tokens, hf.finish, hf.budget = 0, Counter(), budget
    preds, chunk_s = [], []
    tokens0, finish0 = 0, Counter()
    for part in chunks(len(questions), 1 if mode == "naive" else in_flight):
        qs = [questions[i] for i in part]
        bc.sync(device)
        t1 = time.perf_counter()
        try:
            if mode == "naive":
                fronts = [hf.naive(wl, qs[0], max_tokens, seed + part.start)]
            else:
                fronts = hf.strong(wl, qs, max_tokens, seed + part.start)
        except OutOfBudget:
            hf.gen_tokens, hf.finish = tokens0, finish0  # the unfinished part is not counted
            break
        bc.sync(device)
        chunk_s.append(time.perf_counter() - t1)
        tokens0, finish0 = hf.gen_tokens, Counter(hf.finish)
        for leaves in fronts:
            preds.append(majority([answer_value(t) for t in hf.votes(wl, leaves)]))
    n, gens, wall = len(preds), sum(hf.finish.values()), sum(chunk_s)
    if not n:
        return {"system": f"HF {mode}", "workload": wl.key, "in_flight": in_flight,
                "max_tokens": max_tokens, "skipped": "out of --budget inside the first question"}
    return {
        "system": f"HF {mode}", "workload": wl.key, "questions": n,
        "in_flight": 1 if mode == "naive" else in_flight, "max_tokens": max_tokens,
        "temperature": wl.temperature, "wall_s": wall, "s_per_question": wall / n,
        "gen_tokens": hf.gen_tokens, "tok_per_s": hf.gen_tokens / wall, "gen_calls": gens,
        "gen_calls_expected": wl.gen_calls * n, "finish": dict(hf.finish), "preds": preds,
        **score(preds, labels[:n]), "partial": n < len(questions), "chunk_s": chunk_s,
    }


# -- report ----------------------------------------------------------------------------


def render(d: dict[str, Any]) -> str:
    env = d.get("env", {})
    out = [f"# ToT on GSM8K (SGLang tree_of_thought_v0 / _deep)\n",
           f"{bc.env_line(env)}. Command: `{d.get('command')}`\n"]
    rows = []
    for r in d["rows"]:
        if r.get("skipped"):
            rows.append([r["workload"], r["system"], "—", str(r.get("in_flight", "—")),
                         str(r.get("max_tokens", "—")), "skipped", r["skipped"], "", "", "", ""])
            continue
        calls = f"{r['gen_calls']}/{r['gen_calls_expected']}"
        fin = r.get("finish", {})
        acc = f"{bc.fmt(r['accuracy'], '.3f')} ({r['correct']}/{r['questions']})"
        rows.append([
            r["workload"], r["system"] + (" (partial)" if r.get("partial") else ""),
            str(r["questions"]), str(r["in_flight"]), str(r["max_tokens"]),
            bc.fmt(r["wall_s"], ".2f"), bc.fmt(r["s_per_question"], ".3f"),
            bc.fmt(r["tok_per_s"], ",.0f"), f"{calls} ({fin.get('eos', 0)} eos)", acc,
            bc.fmt(r.get("vs_dendrite"), ".1f", "") + ("x" if r.get("vs_dendrite") else ""),
        ])
    out.append(bc.md_table(
        ["workload", "system", "questions", "in-flight", "max tok", "wall s", "s / question",
         "gen tok/s", "gen calls (ended by EOS)", "accuracy", "time vs Dendrite, same questions"],
        rows, right={2, 3, 4, 5, 6, 7, 10}))
    if d.get("notes"):
        out.append("\n" + "\n".join(f"* {n}" for n in d["notes"]) + "\n")
    return "\n".join(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(p)
    p.add_argument("--workloads", default="v0,deep", help="comma list of: " + ", ".join(WORKLOADS))
    p.add_argument("--num-questions", type=int, default=8)
    p.add_argument("--in-flight", default="1,8,64",
                   help="comma list; a row at N runs max(N, --num-questions) questions")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--hf", default="naive,strong", help="HF rows: comma list of naive, strong")
    p.add_argument("--hf-questions", type=int, default=2, help="questions of the HF strong rows")
    p.add_argument("--hf-naive-questions", type=int, default=1,
                   help="questions of the HF naive rows (one generate() per node: slow)")
    p.add_argument("--hf-naive-workloads", default=None,
                   help="workloads with an HF naive row (default: all of --workloads)")
    p.add_argument("--hf-max-tokens", type=int, default=None, help="default: --max-tokens")
    p.add_argument("--hf-in-flight", default="1", help="in-flight values of the HF strong rows")
    p.add_argument("--num-pages", type=int, default=None, help="engine KV pages (default: engine's)")
    a = p.parse_args(argv)
    if a.quick:  # every kind of row, smallest sizes: a CPU smoke test of the whole script
        a.num_questions, a.max_tokens, a.hf_questions, a.hf_naive_questions = 1, 4, 1, 1
        a.in_flight, a.hf_in_flight = "1,2", "1"
    a.hf_max_tokens = a.hf_max_tokens or a.max_tokens
    for name in ("in_flight", "hf_in_flight"):
        try:
            vals = [int(x) for x in getattr(a, name).split(",") if x.strip()]
        except ValueError:
            p.error(f"--{name.replace('_', '-')} must be a comma list of integers")
        if not vals or min(vals) < 1:
            p.error(f"--{name.replace('_', '-')} needs integers >= 1")
        setattr(a, name, vals)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in a.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"--workloads: unknown {', '.join(bad)} (known: {', '.join(WORKLOADS)})")
    a.hf = [] if a.no_hf else [m.strip() for m in a.hf.split(",") if m.strip()]
    bad = [m for m in a.hf if m not in ("naive", "strong")]
    if bad:
        p.error(f"--hf: unknown {', '.join(bad)} (naive, strong)")
    a.hf_naive_workloads = (a.workloads if a.hf_naive_workloads is None else
                            [w.strip() for w in a.hf_naive_workloads.split(",") if w.strip()])
    bad = [w for w in a.hf_naive_workloads if w not in WORKLOADS]
    if bad:
        p.error(f"--hf-naive-workloads: unknown {', '.join(bad)} (known: {', '.join(WORKLOADS)})")
    for name in ("num_questions", "max_tokens", "hf_questions", "hf_naive_questions",
                 "hf_max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    device, dtype, model_dir, budget, res = bc.start("tot_gsm8k", a, render)
    need = max([a.num_questions, a.hf_questions, a.hf_naive_questions, *a.in_flight,
                *a.hf_in_flight])
    questions, labels = load_questions(a.data, need)

    from dendrite.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(model_dir, device=str(device), dtype=dtype, num_pages=a.num_pages)
    res.data["env"]["engine_load_s"] = round(time.perf_counter() - t0, 2)
    res.data["env"]["engine_pages"] = engine.num_pages
    tokenizer = engine.tokenizer  # kept for the HF rows (same ids on both sides)
    chat = bc.ChatTurns.from_tokenizer(tokenizer)
    res.data["env"]["chat_template"] = chat.templated
    if not chat.templated:
        res.note("the model has no chat template: plain 'User:/Assistant:' turns")
    prog = make_program()
    hf_modes = a.hf if a.hf and bc.hf_available() else []
    if a.hf and not hf_modes:
        res.note("transformers is not importable: no HF rows")

    # Warm-up, untimed: first prefill/decode, graph buckets, kernels compiled on first use
    # (also those of the widest batch: every row then runs on warm kernels).
    t0 = time.perf_counter()
    for key in a.workloads:
        prog.run(engine, question=questions[0], wl=WORKLOADS[key], chat=chat, max_tokens=4,
                 seed=a.seed)
    widest = min(max(a.in_flight), len(questions))
    if widest > 1:
        prog.run_batch(engine, [dict(question=q, wl=WORKLOADS[a.workloads[0]], chat=chat,
                                     max_tokens=2) for q in questions[:widest]], seed=a.seed)
    res.data["env"]["dendrite_warmup_s"] = round(time.perf_counter() - t0, 2)

    def dendrite_row(wl, n, in_flight, max_tokens, label):
        if not budget.allows():
            return res.add({"system": label, "workload": wl.key, "in_flight": in_flight,
                            "max_tokens": max_tokens, "skipped": "out of --budget"})
        r = run_dendrite(engine, prog, wl, chat, questions[:n], labels, max_tokens, in_flight,
                         a.seed, budget, device)
        r["system"] = label
        bc.log(f"{wl.key} {label} x{in_flight}: {r['s_per_question']:.3f} s/question, "
               f"{r['tok_per_s']:.0f} tok/s, acc {r['accuracy']:.3f}")
        return res.add(r)

    # HF rows planned first, so the Dendrite rows they compare with run on their settings
    plan: list[tuple[str, str, int, int]] = []  # (workload, mode, in-flight, questions)
    for key in a.workloads:
        if "strong" in hf_modes:
            plan += [(key, "strong", k, max(a.hf_questions, k)) for k in a.hf_in_flight]
    for key in a.hf_naive_workloads if "naive" in hf_modes else []:
        if key in a.workloads:
            plan.append((key, "naive", 1, a.hf_naive_questions))
    matched: dict[tuple[str, int], dict] = {}
    for key in a.workloads:
        wl = WORKLOADS[key]
        done = {}
        for k in a.in_flight:
            n = max(k, a.num_questions)
            done[(n, k, a.max_tokens)] = dendrite_row(wl, n, k, a.max_tokens, "Dendrite")
        for k in sorted({k for w, _, k, _ in plan if w == key}):
            n = max(q for w, _, kk, q in plan if w == key and kk == k)
            same = done.get((n, k, a.hf_max_tokens))  # a row already run on HF's settings
            matched[(key, k)] = same or dendrite_row(wl, n, k, a.hf_max_tokens,
                                                     "Dendrite (HF's settings)")
    engine.close()
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if plan and not budget.allows():
        for key, mode, k, _ in plan:
            res.add({"system": f"HF {mode}", "workload": key, "in_flight": k,
                     "max_tokens": a.hf_max_tokens, "skipped": "out of --budget"})
    elif plan:
        t0 = time.perf_counter()
        model = bc.load_hf(model_dir, device, dtype)
        hf = HFToT(model, tokenizer, chat, device)
        res.data["env"]["hf_load_s"] = round(time.perf_counter() - t0, 2)
        res.data["env"]["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        t0 = time.perf_counter()
        hf.strong(WORKLOADS[a.workloads[0]], questions[:1], 2, a.seed)  # warm-up
        hf.naive(WORKLOADS[a.workloads[0]], questions[0], 2, a.seed)
        res.data["env"]["hf_warmup_s"] = round(time.perf_counter() - t0, 2)
        for key, mode, k, n in plan:  # strong rows first: naive ones are the slowest
            if not budget.allows():
                res.add({"system": f"HF {mode}", "workload": key, "in_flight": k,
                         "max_tokens": a.hf_max_tokens, "skipped": "out of --budget"})
                continue
            r = run_hf(hf, mode, WORKLOADS[key], questions[:n], labels, a.hf_max_tokens, k,
                       a.seed, budget, device)
            base = matched.get((key, k))
            if not r.get("skipped") and base and not base.get("skipped"):
                # the same questions in the same batches: compare their chunks' time
                m = len(r["chunk_s"])
                if len(base["chunk_s"]) >= m:
                    r["dendrite_s_same_questions"] = sum(base["chunk_s"][:m])
                    r["vs_dendrite"] = r["wall_s"] / r["dendrite_s_same_questions"]
                    r["dendrite_row"] = base["system"]
            if not r.get("skipped"):
                bc.log(f"{key} HF {mode} x{k}: {r['s_per_question']:.3f} s/question "
                       f"({r.get('vs_dendrite', float('nan')):.1f}x Dendrite)")
            res.add(r)
    bad = [r for r in res.rows if not r.get("skipped") and r["gen_calls"] != r["gen_calls_expected"]]
    if bad:
        res.note(f"{len(bad)} row(s) ran fewer generations than the workload defines")
    res.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
