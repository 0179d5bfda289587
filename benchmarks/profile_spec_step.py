"""Host cost of a speculative verify step against a plain decode step (issue 18).

For each branch count B, forks B leaves off one prompt and times steps of

* ``plain``: an engine without speculation (steady decode);
* ``verify``: an engine whose drafter proposes k tokens that are never right
  (speculation forced on, nothing accepted: every step is a verify step of
  k+1 tokens per branch, the bench_speculative ``rule`` setting);
* ``accept``: a drafter that proposes the target's own greedy continuation
  (every draft accepted; the commit path of k accepted tokens);
* with ``--model-draft``: ``self``, the model drafting for itself (greedy,
  k draft forwards a step), and ``drawn``, the same drafting at T=1 for
  branches sampled at T=1 (drafts drawn, verified by rejection sampling).

Per step it reports the step's time (median; this process's CPU time by
default, which other load on a shared machine does not move; ``--clock
wall`` for wall time), the time inside the model's
forward (``runner.execute``) and the sampler (device work on a GPU), in the
drafter's ``propose`` (a draft model's forwards included), the rest ("host":
planning, forks, acceptance, commit: what a GPU waits on), and the device->host reads: every ``.item()``, ``.tolist()``,
``.cpu()``, ``.numpy()``, ``int()/float()/bool()`` of a tensor that is not
already a host copy, counted by a torch function mode (one
``SamplerOutput.cpu()`` counts once: on CUDA it is one event wait). With
``--sites`` it prints where those reads are; with ``--cprofile`` the top
Python functions of the verify steps.

    python benchmarks/profile_spec_step.py --model tiny --branches 1,4,16 --steps 40
    python benchmarks/profile_spec_step.py --model tiny --branches 1 --sites --cprofile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import traceback
import weakref
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as C

from dendrite.engine import Engine
from dendrite.sampling import SamplerOutput, SamplingParams
from dendrite.speculative import NgramDrafter, SpeculativeConfig
from dendrite.speculative.tree import DraftTree

#: The clock of every figure: this process's CPU time by default (the machine
#: is shared: other processes' load moves wall times, not this), or wall time
#: (`--clock wall`). Torch runs one intra-op thread here, so CPU time is the
#: time the step's one thread spent.
CLOCK = time.process_time


READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy",
         "__array__"}


class SyncCounter(TorchFunctionMode):
    """Counts device->host reads (see the module docstring).

    On this CPU every tensor is a host tensor, so the mode tracks which ones
    would live on the GPU: a tensor made from host data without a device
    (``torch.tensor(x)``, ``torch.as_tensor(a)``), a ``.cpu()`` /
    ``.to("cpu")`` copy, and any op on only such tensors are host tensors;
    one made with a ``device=`` argument, moved with ``.to(device)``, or
    computed from any device tensor is a device tensor. Reading a device
    tensor is a device->host transfer and a wait."""

    def __init__(self) -> None:
        super().__init__()
        self.host: dict[int, weakref.ref] = {}
        self.count = 0
        self.sites: Counter = Counter()
        self.quiet = 0
        self.active = False
        self.h2d = 0
        # CPU stand-ins: `dendrite.transfer.to_device` is asynchronous on CUDA.
        self.allow_h2d = 0

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def _is_host(self, t: object) -> bool:
        r = self.host.get(id(t))
        return r is not None and r() is t

    def mark_host(self, t: torch.Tensor) -> None:
        key = id(t)
        self.host[key] = weakref.ref(t, lambda _, k=key: self.host.pop(k, None))

    def note_h2d(self, where: str | None) -> None:
        if where is None:
            return
        self.h2d += 1
        self.sites["(H2D, blocking) " + where] += 1

    def note(self, where: str | None) -> None:
        if where is None:
            return
        self.count += 1
        self.sites[where] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.quiet:
            return out
        name = getattr(func, "__name__", "")
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors:  # a creation op: host data unless a device was named
            # (The engine names its device as a torch.device; host code says "cpu".)
            dev = kwargs.get("device")
            host = dev is None or (isinstance(dev, str) and dev == "cpu")
            if not host and name in ("tensor", "as_tensor") and not self.allow_h2d:
                # From host data onto a device without non_blocking: on CUDA
                # a blocking copy, which waits for all queued work.
                self.note_h2d(_site())
        elif name in ("to", "copy_") and self._is_host(args[-1] if name == "copy_" else args[0]) \
                and not kwargs.get("non_blocking") and not self.allow_h2d and not (
                    name == "to" and any(a == "cpu" or (isinstance(a, torch.dtype))
                                         for a in args[1:]) and "device" not in kwargs
                    and not any(isinstance(a, torch.device) for a in args[1:])):
            self.note_h2d(_site())  # a blocking host->device copy
            host = False
        elif name == "cpu" or name == "to":
            explicit_cpu = name == "cpu" or any(
                a == "cpu" for a in [*args[1:], kwargs.get("device")] if isinstance(a, str))
            src_host = self._is_host(args[0])
            if explicit_cpu and not src_host:
                self.note(_site())
            moves = "device" in kwargs or any(isinstance(a, torch.device) for a in args[1:])
            host = explicit_cpu or (src_host and not moves)
        else:
            host = all(self._is_host(a) for a in tensors)
            if name in READS and not self._is_host(args[0]):
                self.note(_site())
        if host:
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    self.mark_host(o)
        return out


def _site() -> str | None:
    """The innermost dendrite frame that asked (file:line function); None inside
    the reference attention backend, which only CPU runs use (FlashInfer plans
    from the host copies of the metadata)."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if f.filename.endswith("attention/reference.py"):
            return None
        if "/dendrite/" in f.filename and "profile_spec_step" not in f.filename:
            return f"{f.filename.split('/dendrite/')[-1]}:{f.lineno} {f.name}"
    return "?"


@contextmanager
def instrumented(counter: SyncCounter):
    """Patch what the torch function mode cannot see, and restore it after:

    * `torch.from_numpy` (not a torch function) makes a host tensor;
    * `dendrite.transfer.to_device` makes a device tensor (an asynchronous
      copy on CUDA), though on this CPU it is `torch.from_numpy`;
    * `SamplerOutput.cpu_async` and `drafters.host_copies` are one wait each
      on CUDA, however many tensors they copy: each counts once, and what
      they return is a host copy;
    * `step._to_host` queues copies that the step's `SamplerOutput` wait
      covers (no wait of its own): its results are host copies."""
    import dendrite.speculative.drafters as D
    import dendrite.speculative.step as S
    import dendrite.transfer as T

    patches: list[tuple[object, str, object]] = []

    def patch(obj, name, new):
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, new)

    orig_from_numpy = torch.from_numpy

    def from_numpy(arr):  # (not a torch function: the mode does not see it)
        t = orig_from_numpy(arr)
        counter.mark_host(t)
        return t
    patch(torch, "from_numpy", from_numpy)

    orig_to_device = T.to_device

    def to_device(arr, device):
        t = orig_to_device(arr, device)
        counter.host.pop(id(t), None)
        return t
    for mod in list(sys.modules.values()):
        if getattr(mod, "to_device", None) is orig_to_device:
            patch(mod, "to_device", to_device)

    def one_wait(orig, outputs):
        def wrapped(*args):
            if counter.quiet or not counter.active:
                return orig(*args)
            counter.note(_site())
            counter.quiet += 1
            try:
                out = orig(*args)
            finally:
                counter.quiet -= 1
            for t in outputs(out):
                if t is not None:
                    counter.mark_host(t)
            return out
        return wrapped

    orig_cpu_async = SamplerOutput.cpu_async

    def cpu_async(self):
        out = orig_cpu_async(self)()
        return lambda: out
    def sampler_fields(wait):
        o = wait()
        return o.token_ids, o.logprobs, o.top_token_ids, o.top_logprobs
    patch(SamplerOutput, "cpu_async", one_wait(cpu_async, sampler_fields))
    if hasattr(D, "host_copies"):
        patch(D, "host_copies", one_wait(D.host_copies, lambda out: out))
    if hasattr(S, "_to_host"):
        orig_to_host = S._to_host

        def to_host(t):
            counter.quiet += 1
            try:
                out = orig_to_host(t)
            finally:
                counter.quiet -= 1
            if counter.active:
                counter.mark_host(out)
            return out
        patch(S, "_to_host", to_host)
    try:
        yield counter
    finally:
        for obj, name, old in reversed(patches):
            setattr(obj, name, old)


class NeverRight(NgramDrafter):
    """k copies of token 0: never the model's token (a forced verify step)."""

    def propose(self, keys, contexts, shape, depths):
        return [DraftTree([0] * d, list(range(-1, d - 1)), [1.0] * d) for d in depths]


class Oracle(NgramDrafter):
    """The target's own greedy continuation (recorded from a plain run): always right."""

    def __init__(self, continuation: dict[tuple, list[int]]) -> None:
        super().__init__()
        self.cont = continuation

    def propose(self, keys, contexts, shape, depths):
        out = []
        for ctx, d in zip(contexts, depths):
            ctx = list(ctx)
            full = next((v for k, v in self.cont.items() if ctx[:len(k)] == list(k)), None)
            toks = full[len(ctx):len(ctx) + d] if full is not None else []
            out.append(DraftTree(toks, list(range(-1, len(toks) - 1)), [1.0] * len(toks)))
        return out


class Timed:
    """Accumulates the seconds spent in a callable."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **kw):
        t0 = CLOCK()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += CLOCK() - t0


def run(engine: Engine, ids: list[int], b: int, steps: int, counter: SyncCounter | None = None,
        prof: cProfile.Profile | None = None, temperature: float = 0.0) -> dict:
    """`steps` engine steps over `b` greedy branches: per-step medians of wall,
    forward, sampler and the rest ("host"); with `counter`, the reads per
    step (counting slows the step: a separate pass); with `prof`, cProfile."""
    root = engine.new_sequence(ids, add_bos=False)
    engine.flush([root])
    seqs = root.fork(b) if b > 1 else [root]
    hs = [engine.submit(s, SamplingParams(temperature=temperature, seed=i,
                                          max_tokens=10 * steps + 16, ignore_eos=True))
          for i, s in enumerate(seqs)]
    for _ in range(3):
        engine.step()
    execute = engine.runner.execute = Timed(engine.runner.execute)
    sampler = engine.sampler = Timed(engine.sampler)
    spec = engine._spec
    drafter = Timed(spec.drafter.propose if spec is not None else None)
    if spec is not None:
        spec.drafter.propose = drafter
    walls, fwd, smp, drf = [], [], [], []
    if counter is not None:
        counter.count = counter.h2d = 0
        counter.sites.clear()
    tokens0 = sum(len(h.token_ids) for h in hs)
    spec0 = engine.stats.get("spec_steps", 0)
    for _ in range(steps):
        f0, s0, d0 = execute.seconds, sampler.seconds, drafter.seconds
        t0 = CLOCK()
        if prof is not None:
            prof.enable()
        if counter is not None:
            with counter:
                engine.step()
        else:
            engine.step()
        if prof is not None:
            prof.disable()
        walls.append(CLOCK() - t0)
        fwd.append(execute.seconds - f0)
        smp.append(sampler.seconds - s0)
        drf.append(drafter.seconds - d0)
    tokens = sum(len(h.token_ids) for h in hs) - tokens0
    del engine.runner.execute
    if spec is not None:
        del spec.drafter.propose
    engine.sampler = sampler.fn
    for h in hs:
        engine.cancel(h)
    for s in seqs:
        s.release()
    if root not in seqs:
        root.release()
    med = statistics.median
    return {"wall_ms": 1e3 * med(walls), "forward_ms": 1e3 * med(fwd),
            "sampler_ms": 1e3 * med(smp), "draft_ms": 1e3 * med(drf),
            "host_ms": 1e3 * med(w - f - s - d for w, f, s, d in zip(walls, fwd, smp, drf)),
            "syncs": counter.count / steps if counter is not None else None,
            "h2d": counter.h2d / steps if counter is not None else None,
            "tokens_per_step": tokens / steps,
            "spec_steps": engine.stats.get("spec_steps", 0) - spec0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--branches", default="1,4,16")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timing passes (the best kept)")
    p.add_argument("--engines", default=None,
                   help="comma-separated subset of plain,verify,accept,self,drawn")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="CPU time of this process (default: robust to other load) or wall")
    p.add_argument("--model-draft", action="store_true",
                   help="also a model drafting for itself: greedy ('self') and drawn at "
                        "T=1 for branches sampled at T=1 ('drawn': rejection sampling)")
    p.add_argument("--sites", action="store_true", help="print where the reads are")
    p.add_argument("--cprofile", action="store_true", help="top functions of the verify steps")
    a = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    model_dir = C.resolve_model(a.model)
    counter = SyncCounter()
    stack = ExitStack()
    stack.enter_context(instrumented(counter))
    kw = {"device": "cpu", "num_pages": 2048, "lookahead": False}
    plain = Engine(model_dir, **kw)
    ids = plain.encode("The quick brown fox jumps over the lazy dog. A tree of thought")
    # The greedy continuation, for the always-right drafter.
    s = plain.new_sequence(ids, add_bos=False)
    cont = plain.generate(s, SamplingParams(temperature=0, max_tokens=12 * a.steps + 40,
                                            ignore_eos=True))[0].token_ids
    s.release()
    engines = {
        "plain": plain,
        "verify": Engine(model_dir, speculative=SpeculativeConfig(
            drafter=NeverRight(), num_draft=a.k, break_even=0.0, max_rows=1 << 20), **kw),
        "accept": Engine(model_dir, speculative=SpeculativeConfig(
            drafter=Oracle({tuple(ids): ids + cont}), num_draft=a.k, break_even=0.0,
            max_rows=1 << 20), **kw),
    }
    if a.model_draft:
        engines["self"] = Engine(model_dir, speculative=SpeculativeConfig(
            method="model", draft_model=str(model_dir), num_draft=a.k, break_even=0.0,
            max_rows=1 << 20), **kw)
        engines["drawn"] = Engine(model_dir, speculative=SpeculativeConfig(
            method="model", draft_model=str(model_dir), num_draft=a.k, break_even=0.0,
            max_rows=1 << 20, draft_temperature=1.0), **kw)
    prof = cProfile.Profile() if a.cprofile else None
    print(f"model {model_dir.name}, CPU, {a.threads} thread(s), k={a.k}, {a.steps} steps, "
          f"{a.clock} clock, best of {a.repeats}")
    print("| B | engine | step ms | forward ms | sampler ms | draft ms | host ms "
          "| D->H reads/step | blocking H->D/step | tokens/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    only = set(a.engines.split(",")) if a.engines else set(engines)
    for b in [int(x) for x in a.branches.split(",")]:
        for name, eng in engines.items():
            if name not in only:
                continue
            t = 1.0 if name == "drawn" else 0.0
            # (Best of --repeats timing passes: this machine's noise is one-sided.)
            r = min((run(eng, ids, b, a.steps, temperature=t) for _ in range(a.repeats)),
                    key=lambda x: x["wall_ms"])
            c = run(eng, ids, b, a.steps, counter, temperature=t)
            r["syncs"], r["h2d"] = c["syncs"], c["h2d"]
            if prof is not None and name == "verify":
                run(eng, ids, b, a.steps, prof=prof)
            print(f"| {b} | {name} | {r['wall_ms']:.3f} | {r['forward_ms']:.3f} | "
                  f"{r['sampler_ms']:.3f} | {r['draft_ms']:.3f} | {r['host_ms']:.3f} | {r['syncs']:.2f} | "
                  f"{r['h2d']:.2f} | {r['tokens_per_step']:.2f} |")
            if a.sites and counter.sites:
                for site, n in counter.sites.most_common():
                    print(f"    {n / a.steps:6.2f}/step  {site}")
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    for eng in engines.values():
        eng.close()
    stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
