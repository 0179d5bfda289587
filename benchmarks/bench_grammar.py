"""CPU mask time per token for grammar constraints (dendrite.grammar).

For a JSON-schema and a regex constraint, at batch 1 and 16, drives matchers
along valid random trajectories (random logits, masks applied, forced tokens
appended) and times each batched `fill_masks` call: the work the engine
overlaps with the GPU forward. Prints a markdown table of median / p99 µs per
step (one mask per sequence in the batch) and per sequence-token.

No model hub is reachable, so the default tokenizer is a byte-level BPE
trained here on the Python standard library's sources (32k vocab, like
Llama-2/Mistral; cached under ~/.cache/dendrite). Pass --tokenizer to time a
real model's tokenizer.json instead.

    python benchmarks/bench_grammar.py [--vocab 32000] [--steps 2000] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dendrite.grammar import (
    Constraint,
    GrammarTokenizer,
    Matcher,
    apply_masks,
    fill_masks,
)

EOS = "<|eos|>"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.(com|org|net)$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 40},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}

REGEX = r"[A-Z][a-z]+( [a-z]+){3,30}\. The answer is [0-9]{1,6}\."


def trained_tokenizer(vocab: int) -> Path:
    """A byte-level BPE of `vocab` ids trained on the stdlib sources (cached)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dendrite"
    path = cache / f"bench_bpe_{vocab}.json"
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(f"{stdlib}/*.py") + glob.glob(f"{stdlib}/*/*.py"))

    def texts():
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield fh.read()

    print(f"training a {vocab}-token BPE on {len(files)} stdlib files ...", file=sys.stderr)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    cache.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def closing_bias(gtok: GrammarTokenizer, strength: float) -> torch.Tensor:
    """Favor EOS and tokens closing strings/containers so outputs finish."""
    bias = torch.zeros(gtok.vocab_size)
    for i in range(gtok.tokenizer_vocab_size):
        b = gtok.ll.decode_bytes([i])
        if i in gtok.eos_token_ids or b'"' in b or b"}" in b or b"." in b:
            bias[i] = strength
    return bias


def measure(
    constraint: Constraint,
    gtok: GrammarTokenizer,
    batch: int,
    steps: int,
    seed: int,
    pool_threads: int,
):
    """Per-step fill_masks times (ns) and per-token consume+forced times (ns)."""
    gen = torch.Generator().manual_seed(seed)
    bias = closing_bias(gtok, 3.0)
    bitmask = gtok.allocate_bitmask(batch)
    matchers: list[Matcher] = [constraint.matcher(gtok) for _ in range(batch)]
    lengths = [0] * batch
    fill_ns: list[int] = []
    advance_ns: list[int] = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        fill_masks(matchers, bitmask, threads=pool_threads)
        fill_ns.append(time.perf_counter_ns() - t0)
        logits = torch.randn(batch, gtok.vocab_size, generator=gen) * 2.0 + bias
        apply_masks(logits, bitmask)
        u = torch.rand(logits.shape, generator=gen).clamp_(min=1e-20)
        picks = (logits - torch.log(-torch.log(u))).argmax(dim=-1).tolist()
        for i, t in enumerate(picks):
            m = matchers[i]
            t0 = time.perf_counter_ns()
            m.consume(t)
            ff = m.forced_tokens()
            if ff:
                m.consume_many(ff)
            advance_ns.append(time.perf_counter_ns() - t0)
            lengths[i] += 1 + len(ff)
            # A finished (or very long) generation restarts, like a new request.
            if m.is_stopped() or lengths[i] > 400:
                matchers[i] = constraint.matcher(gtok)
                lengths[i] = 0
    return fill_ns, advance_ns


def time_apply(device: str, batch: int, vocab: int, iters: int = 300) -> tuple[float, float]:
    """Median and p99 µs of apply_masks on `device`: pinned-bitmask copy + unpack + fill."""
    words = (vocab + 31) // 32
    pin = device.startswith("cuda")
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int64)
    bitmask = bitmask.to(torch.int32).pin_memory() if pin else bitmask.to(torch.int32)
    logits = torch.randn(batch, vocab, device=device)
    times = []
    for i in range(iters + 20):
        if pin:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            apply_masks(logits, bitmask)
            end.record()
            end.synchronize()
            us = start.elapsed_time(end) * 1000
        else:
            t0 = time.perf_counter_ns()
            apply_masks(logits, bitmask)
            us = (time.perf_counter_ns() - t0) / 1000
        if i >= 20:
            times.append(us)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))]


def pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokenizer", help="tokenizer.json of a real model (default: trained BPE)")
    ap.add_argument("--eos", default=EOS, help="EOS token string (with --tokenizer)")
    ap.add_argument("--vocab", type=int, default=32000, help="trained BPE size (no --tokenizer)")
    ap.add_argument("--steps", type=int, default=2000, help="timed steps per configuration")
    ap.add_argument("--batches", default="1,16")
    # One torch thread by default: the engine does little torch work on the
    # CPU, and idle OpenMP workers spinning after each op starve the mask
    # pool's threads (a 10x distortion measured on 16 cores).
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    # llguidance's own default size: 80% of the CPUs, at most 32.
    ap.add_argument("--pool-threads", type=int,
                    default=max(1, min(32, (os.cpu_count() or 1) * 4 // 5)),
                    help="llguidance pool threads of the 'pool' rows (fill_masks threads=)")
    ap.add_argument("--apply-device", help="also time apply_masks there (e.g. cuda)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tokenizers import Tokenizer

    path = Path(args.tokenizer) if args.tokenizer else trained_tokenizer(args.vocab)
    hf = Tokenizer.from_file(str(path))
    eos = hf.token_to_id(args.eos)
    if eos is None:
        raise SystemExit(f"EOS token {args.eos!r} not in {path}")
    # Pad the model vocab to a multiple of 64, as model embeddings usually are.
    model_vocab = (hf.get_vocab_size() + 63) // 64 * 64
    t0 = time.perf_counter()
    gtok = GrammarTokenizer(hf, eos, vocab_size=model_vocab)
    tok_s = time.perf_counter() - t0

    constraints = {
        "json_schema": Constraint(json_schema=SCHEMA),
        "regex": Constraint(regex=REGEX),
    }
    compile_ms = {}
    for name, c in constraints.items():
        t0 = time.perf_counter()
        c.compile(gtok)
        compile_ms[name] = (time.perf_counter() - t0) * 1000

    print(
        f"\ntokenizer: {path.name}, vocab {gtok.tokenizer_vocab_size} (model {gtok.vocab_size}); "
        f"GrammarTokenizer build {tok_s * 1000:.0f} ms; torch threads {torch.get_num_threads()}; "
        f"{os.cpu_count()} CPUs\n"
    )
    print(
        "| constraint | batch | fill | compile ms | mask µs/step median | mask µs/step p99 "
        "| mask µs/token median | consume+forced µs/token median |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, c in constraints.items():
        for batch in (int(b) for b in args.batches.split(",")):
            # "pool": llguidance's parallel executor; "inline": one matcher
            # after another on the calling thread. Same seed, same states.
            for pool in (0, args.pool_threads) if batch > 1 else (0,):
                fill, adv = measure(c, gtok, batch, args.steps, seed=batch, pool_threads=pool)
                fill = fill[10:]  # drop the first steps (lazy lexer-state build-up)
                med, p99 = pct(fill, 0.5), pct(fill, 0.99)
                mode = f"pool of {pool}" if pool else "inline"
                print(
                    f"| {name} | {batch} | {mode} | {compile_ms[name]:.1f} | {med:.1f} | {p99:.1f} "
                    f"| {med / batch:.1f} | {statistics.median(adv) / 1000:.1f} |",
                    flush=True,
                )

    if args.apply_device:
        print(f"\napply_masks on {args.apply_device} (bitmask copy + unpack + masked fill):\n")
        print("| vocab | batch | µs median | µs p99 |")
        print("| ---: | ---: | ---: | ---: |")
        for vocab in (gtok.vocab_size, 152064):
            for batch in (int(b) for b in args.batches.split(",")):
                med, p99 = time_apply(args.apply_device, batch, vocab)
                print(f"| {vocab} | {batch} | {med:.1f} | {p99:.1f} |", flush=True)


if __name__ == "__main__":
    main()
