"""Prints the native KV core's latencies as a markdown table (median of repeats).

    python benchmarks/bench_native.py [--repeats 7] [--quick]

Rows: fork at 1K/16K/128K-token contexts (timed inside C++ with steady_clock,
and through Python via dendrite.kv), append (1 token; 64-leaf batch), CSR
export for 64 leaves, radix prefix match. Targets (issue 2): fork < 1 us
native and < 5 us from Python, the 128K figure within 1.5x of the 1K one.
The same figures are tracked by asv in asv_bench/benchmarks_native.py.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from dendrite import _native
from dendrite.kv import BlockPool, KVTree, RadixCache

PAGE = 16
CONTEXTS = {"1K": 1024, "16K": 16 * 1024, "128K": 128 * 1024}


def median_us(fn, repeats: int, inner: int) -> float:
    """Median over `repeats` of the mean time of `inner` calls of fn(i), in us."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(inner):
            fn(i)
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def context_tree(num_tokens: int, extra_pages: int = 16384):
    pool = BlockPool(num_tokens // PAGE + extra_pages, page_size=PAGE)
    tree = KVTree(pool)
    root = tree.new_sequence()
    tree.append(root, np.arange(num_tokens, dtype=np.int32) % 32000)
    return pool, tree, root


def bench_fork_python(tree: KVTree, root: int, repeats: int, inner: int) -> float:
    samples = []
    for _ in range(repeats):
        kids = []
        t0 = time.perf_counter()
        for _ in range(inner):
            kids.append(tree.fork(root, 1))
        samples.append((time.perf_counter() - t0) / inner * 1e6)
        for k in kids:
            tree.release(k[0])
    return statistics.median(samples)


def run(repeats: int, quick: bool) -> list[tuple[str, str, float, str]]:
    rows = []
    inner = 2000 if quick else 10000
    for name, n in CONTEXTS.items():
        pool, tree, root = context_tree(n)
        native_ns = statistics.median(
            _native.bench_fork_ns(tree, root, inner, 5) for _ in range(repeats))
        rows.append(("fork (native, C++ steady_clock)", name, native_ns / 1000, "< 1 us"))
        rows.append(("fork (Python, KVTree.fork(node, 1))", name,
                     bench_fork_python(tree, root, repeats, inner), "< 5 us"))

    for name, n in CONTEXTS.items():
        pool, tree, root = context_tree(n)
        leaf = tree.fork_one(root)
        tok = np.array([7], dtype=np.int32)
        # Decode-style: one token per call; truncate keeps the leaf short (untimed
        # share is small: truncate is O(1) here as no page boundary is crossed often).
        rows.append(("append 1 token (Python)", name,
                     median_us(lambda i: tree.append(leaf, tok), repeats, 1000 if quick else 4000), ""))
        leaves = np.array(tree.fork(root, 64), dtype=np.int64)
        counts = np.ones(64, dtype=np.int32)
        toks = np.full(64, 5, dtype=np.int32)
        rows.append(("append_batch 64 leaves x 1 token", name,
                     median_us(lambda i: tree.append_batch(leaves, counts, toks), repeats, 200), ""))
        rows.append(("export_csr 64 leaves", name,
                     median_us(lambda i: tree.export_csr(leaves), repeats, 50 if n > 20000 else 200), ""))

    for name, n in CONTEXTS.items():
        pool, tree, root = context_tree(n)
        cache = RadixCache(pool)
        tokens = tree.tokens(root)
        cache.insert(tokens, tree.pages(root), now=0.0)
        rows.append(("radix match_prefix (full hit)", name,
                     median_us(lambda i: cache.match_prefix(tokens, now=1.0, pin=False), repeats,
                               20 if n > 20000 else 200), ""))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer iterations (CI smoke run)")
    args = ap.parse_args(argv)
    rows = run(args.repeats, args.quick)
    print(f"Dendrite native core, page_size={PAGE}, {platform.processor() or platform.machine()}, "
          f"median of {args.repeats} repeats\n")
    print("| operation | context | median (us) | target |")
    print("| --- | --- | ---: | --- |")
    for op, ctx, us, target in rows:
        print(f"| {op} | {ctx} | {us:.3f} | {target} |")
    forks = {(op, ctx): us for op, ctx, us, _ in rows if op.startswith("fork")}
    for op in sorted({op for op, _ in forks}):
        ratio = forks[(op, "128K")] / forks[(op, "1K")]
        print(f"\n{op}: 128K / 1K = {ratio:.2f}x (target <= 1.5x)", end="")
    print()


if __name__ == "__main__":
    main()
