"""The `dendrite` command: generate, run a search script, or the fork demo."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dendrite generate",
                                description="Generate text from a prompt, streaming tokens.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None,
                   help="local HuggingFace-format model dir (default: the built-in model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    args = p.parse_args(argv)

    from dendrite.engine import Engine
    from dendrite.sampling import SamplingParams

    t0 = time.perf_counter()
    engine = Engine(args.model, device=args.device)
    print(f"[dendrite] model {engine.runner.model_dir} on {engine.device} "
          f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    prompt = args.prompt
    if args.chat:
        prompt = engine.runner.apply_chat_template([{"role": "user", "content": prompt}])
    seq = engine.new_sequence(prompt, add_bos=not args.chat)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    prompt_len = seq.num_tokens
    handle = engine.submit(seq, params)
    shown = ""
    t_start = time.perf_counter()
    t_first = None
    while not handle.done:
        engine.step()
        if not handle.token_ids:
            done = prompt_len - len(seq.pending)
            print(f"\r[dendrite] prefill {done}/{prompt_len} tokens", end="", file=sys.stderr)
            continue
        if t_first is None:
            t_first = time.perf_counter()
            print("\r\033[K", end="", file=sys.stderr)
        text = engine.tokenizer.decode(handle.token_ids, skip_special_tokens=True)
        if not handle.done and text.endswith("\ufffd"):
            continue  # half a multi-byte character: wait for the rest
        final = handle.result.text if handle.done else text
        if final.startswith(shown):
            sys.stdout.write(final[len(shown):])
            sys.stdout.flush()
            shown = final
    t_end = time.perf_counter()
    n = len(handle.token_ids)
    decode_s = t_end - (t_first or t_end)
    print(file=sys.stdout)
    print(f"[dendrite] {prompt_len} prompt tokens, {n} generated "
          f"({handle.result.finish_reason}); first token {((t_first or t_end) - t_start)*1e3:.0f} ms, "
          f"{(n - 1) / decode_s if n > 1 and decode_s > 0 else 0:.1f} tok/s", file=sys.stderr)
    return 0


def _run(argv: list[str]) -> int:
    from dendrite.program.cli_run import run_script_main

    return run_script_main(argv)


def _demo(argv: list[str]) -> int:
    from dendrite.demo import main as demo_main

    return demo_main(argv) or 0


COMMANDS = {
    "generate": (_generate, "generate text from a prompt (streams tokens)"),
    "run": (_run, "run a .dendrite search script"),
    "demo": (_demo, "fork a 128K-token context 1000 times; print latency and pages"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: dendrite {generate,run,demo} ...\n", file=sys.stderr)
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<9} {help_}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    fn, _ = COMMANDS[argv[0]]
    return fn(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
