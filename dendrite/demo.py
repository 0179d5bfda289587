"""`dendrite demo`: fork a 128K-token context 1000 times; print latency and pages used.

Runs on the native KV bookkeeping alone (no model, no GPU): it shows that a
fork costs the same at any context length and shares every page, and that a
child's first write costs at most one page (plus one partial-page copy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional, Sequence


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``dendrite demo`` (sizes range-checked by argparse)."""
    from dendrite.cli_common import non_negative_int, positive_int

    ap.add_argument("--context", type=positive_int, default=128 * 1024,
                    help="context tokens (default 131072)")
    ap.add_argument("--forks", type=positive_int, default=1000,
                    help="children to fork (default 1000)")
    ap.add_argument("--page-size", type=positive_int, default=16,
                    help="tokens per KV page (default 16)")
    ap.add_argument("--write", type=non_negative_int, default=1,
                    help="tokens each child then appends (default 1)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dendrite demo [flags]``; returns the exit status (`dendrite.cli`'s rule)."""
    from dendrite.cli_common import run_command

    ap = argparse.ArgumentParser(prog="dendrite demo", usage="%(prog)s [options]",
                                 description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--traceback", action="store_true",
                    help="show the full traceback of an error instead of one line")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # --help or argparse's usage error, already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return run_command(lambda: run(args), prog="dendrite demo", traceback=args.traceback)


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed flags and print its report."""
    # numpy and the native core load here, not when `dendrite --help` builds the parser.
    import numpy as np

    from dendrite import _native
    from dendrite.kv import BlockPool, KVTree, check_invariants

    ps, n, forks = args.page_size, args.context, args.forks
    ctx_pages = -(-n // ps)
    per_child = -(-(n % ps + args.write) // ps) if args.write else 0
    pool = BlockPool(ctx_pages + forks * max(per_child, 1) + 16, page_size=ps)
    tree = KVTree(pool)

    root = tree.new_sequence()
    t0 = time.perf_counter()
    tree.append(root, np.arange(n, dtype=np.int32) % 32000)
    t_ctx = time.perf_counter() - t0
    used_ctx = pool.used

    lat_ns, kids = [], []
    for _ in range(forks):  # timed one by one for the distribution
        t = time.perf_counter_ns()
        kids.append(tree.fork(root, 1)[0])
        lat_ns.append(time.perf_counter_ns() - t)
    used_fork = pool.used
    native_ns = _native.bench_fork_ns(tree, root, 10000, 5)

    copies = 0
    if args.write:
        tok = np.full(args.write, 7, dtype=np.int32)
        for k in kids:
            copies += len(tree.append(k, tok).copies)
    used_write = pool.used
    check_invariants(pool)
    for k in kids:
        tree.release(k)
    tree.release(root)

    lat_us = np.asarray(lat_ns) / 1000.0
    print(f"Dendrite demo: {n:,}-token context ({used_ctx:,} pages of {ps} tokens), "
          f"forked {forks:,} times")
    print(f"  context bookkeeping (append {n:,} tokens): {t_ctx * 1e3:.1f} ms")
    print(f"  fork latency from Python: median {statistics.median(lat_us):.2f} us, "
          f"p99 {np.percentile(lat_us, 99):.2f} us, total {lat_us.sum() / 1e3:.2f} ms")
    print(f"  fork latency native (C++):  {native_ns:.0f} ns")
    print(f"  pages used: context {used_ctx:,}; after {forks:,} forks {used_fork:,} "
          f"(+{used_fork - used_ctx}); a copying fork would need {used_ctx * (forks + 1):,}")
    if args.write:
        print(f"  after each child appends {args.write} token(s): {used_write:,} pages "
              f"(+{used_write - used_fork:,}), {copies:,} copy-on-write page copies")
    print(f"  after releasing everything: {pool.used} pages used, high watermark "
          f"{pool.high_watermark:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
