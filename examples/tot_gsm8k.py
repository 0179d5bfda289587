"""Tree-of-Thought over GSM8K questions, written with the Python DSL.

    python examples/tot_gsm8k.py --model DIR [DATA.jsonl] [--limit 5]
        [--width 3 --keep 2 --depth 2] [--seed 0] [--tree tot.html]

DATA defaults to examples/data/gsm8k_sample.jsonl (5 questions of the GSM8K
test split, MIT licensed: see examples/data/LICENSE-gsm8k); any GSM8K-format
JSONL file works ({"question": ..., "answer": "... #### 72"}).

All questions run as one batch (`Program.run_batch`): the thoughts of every
question and every branch are generated in the same engine steps. A random
tiny model will not solve GSM8K; a real instruct model is needed for accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dendrite.program as dp
from dendrite.program.answers import number
from dendrite.search import tot_bfs

DEFAULT_DATA = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"


@dp.program
def solve(s, question: str, width: int = 3, keep: int = 2, depth: int = 2, step_tokens: int = 48):
    """ToT BFS over lines of reasoning, then a constrained numeric answer."""
    s += f"Question: {question}\nLet's think step by step.\n"
    step = dict(name="thought", max_tokens=step_tokens, stop="\n", temperature=0.8)
    best = tot_bfs(s, width=width, keep=keep, depth=depth, step=step, by=dp.score.logprob)
    best += "\nTherefore, the answer is "
    best.gen("answer", max_tokens=8, regex=r"-?[0-9]+")
    return number(best["answer"])


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """GSM8K JSONL rows as {"question", "gold"} (gold: the number after ####)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            gold = number(row.get("answer", "").split("####")[-1])
            rows.append({"question": row["question"], "gold": gold})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="GSM8K-format JSONL")
    p.add_argument("--model", default=None, help="HF-format model dir (default: the built-in model)")
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--width", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--step-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tree", default=None, help="write the explored trees as HTML")
    args = p.parse_args(argv)

    from dendrite.engine import Engine
    from dendrite.program.progress import Progress

    rows = load_questions(args.data, args.limit)
    engine = Engine(args.model, device=args.device)
    batch = [
        dict(question=r["question"], width=args.width, keep=args.keep, depth=args.depth,
             step_tokens=args.step_tokens)
        for r in rows
    ]
    progress = Progress()
    results = solve.run_batch(engine, batch, seed=args.seed, progress=progress)
    progress.close()
    correct = 0
    for r, res in zip(rows, results):
        ok = res.value is not None and res.value == r["gold"]
        correct += ok
        print(f"{'✓' if ok else '✗'} predicted {res.value!s:>8}  gold {r['gold']!s:>8}  {r['question'][:60]}...")
    res0 = results[0]
    print(f"\naccuracy {correct}/{len(rows)} · {res0.steps} engine steps for {len(rows)} questions "
          f"· {len(res0.tree)} nodes · {res0.gen_tokens} generated tokens · {res0.seconds:.1f}s")
    if args.tree:
        from dendrite.tree_view import write_html

        write_html(res0.tree, args.tree, title="Tree-of-Thought on GSM8K")
        print(f"tree written to {args.tree}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
