"""Batched sampling with per-sequence parameters and reproducible seeds.

`sample(logits, params, positions)` picks one token per row; every row has its
own `SamplingParams`. Processing order follows transformers: repetition
penalty, allowed-token mask, then for sampled rows temperature, top-k, top-p,
min-p; greedy rows (temperature 0) take the argmax.

Determinism: a sampled row draws with the Gumbel-max trick, its noise for
token `v` a counter-based hash of `(seed, position, v)` computed with exact
int64 arithmetic. So the draw of a sequence with seed `s` at absolute
position `i` depends only on `(s, i)` and that row's logits: the same for any
batch composition, and a forked branch sharing the seed draws exactly what
an unforked run draws. Rows without a seed get fresh random keys.

Reported logprobs are the model's: `log_softmax` of the raw logits, before
penalties, masks and temperature. So are the top-n alternatives a row asks
for (`SamplingParams.logprobs`), computed from its logits row on either path.

Two paths pick the tokens: the torch ops here (the reference, and the only
one on the CPU), and on CUDA the one-pass Triton kernel of
dendrite/kernels/sample.py for batches it covers (masks, temperature, seeded
noise) when the sampler's `KernelConfig` allows it. Both give the same tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dendrite.kernels.config import KernelConfig
from dendrite.transfer import to_device

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "fusable_params",
    "gumbel_noise",
    "row_keys",
    "sample",
    "top_logprobs",
]

_M64 = (1 << 64) - 1


def _real(name: str, value: object) -> float:
    """`value` as a float, or a TypeError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN")
    return float(value)


def _integer(name: str, value: object) -> int:
    """`value` as an int, or a TypeError naming the parameter (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


@dataclass
class SamplingParams:
    """How to pick tokens for one generation request (see design.md)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # <= 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # top-n alternatives to report; the chosen token's is always reported
    #: Keep the matched stop string at the end of the text (default: cut, as
    #: SGLang and OpenAI do). Text only: the tokens stay in the sequence.
    include_stop: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Checked here, at the boundary: a NaN temperature or a float token id
        # would otherwise surface steps later as wrong tokens deep in a kernel.
        self.temperature = _real("temperature", self.temperature)
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), "
                             f"got {self.temperature}")
        self.top_p = _real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = _real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be finite and > 0, "
                             f"got {self.repetition_penalty}")
        self.top_k = _integer("top_k", self.top_k)
        self.max_tokens = _integer("max_tokens", self.max_tokens)
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        self.logprobs = _integer("logprobs", self.logprobs)
        if self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.seed is not None:
            # Seeds key a 64-bit hash: outside [0, 2**64) two seeds would alias.
            self.seed = _integer("seed", self.seed)
            if not 0 <= self.seed < 1 << 64:
                raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if not isinstance(self.include_stop, (bool, np.bool_)):
            raise TypeError(f"include_stop must be a bool, got {self.include_stop!r} "
                            f"of type {type(self.include_stop).__name__}")
        self.include_stop = bool(self.include_stop)
        stop = self.stop
        self.stop_strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
        for s in self.stop_strings:
            if not isinstance(s, str):
                raise TypeError(f"stop must be a string or a list of strings, "
                                f"got an item {s!r} of type {type(s).__name__}")
        ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, (int, np.integer)) \
            else self.stop_token_ids
        self.stop_token_ids = tuple(_integer("stop_token_ids", t) for t in ids)
        for t in self.stop_token_ids:
            if t < 0:
                raise ValueError(f"stop_token_ids must be token ids >= 0, got {t}")

    @property
    def greedy(self) -> bool:
        """Whether sampling is greedy (temperature 0)."""
        return self.temperature == 0.0


@dataclass
class SamplerOutput:
    """Per-row results, tensors on the logits' device (call `.cpu()` once)."""

    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor  # float32 [B], chosen token under the model
    #: int64 [B, n], n = the most `logprobs` any row asked for (None: none
    #: asked): row r's best `params[r].logprobs` tokens, best first; the
    #: rest of the row is -1 (see `top_logprobs`).
    top_token_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None  # float32 [B, n], -inf past a row's count

    def cpu(self) -> SamplerOutput:
        """Host copies; from CUDA all copies are queued first and waited for once."""
        return self.cpu_async()()

    def cpu_async(self) -> Callable[[], SamplerOutput]:
        """Queue the host copies now; the returned function waits for them and
        gives the host `SamplerOutput`. Meanwhile the host can queue more work."""
        fields = (self.token_ids, self.logprobs, self.top_token_ids, self.top_logprobs)
        if not self.token_ids.is_cuda:
            out = SamplerOutput(*(None if t is None else t.cpu() for t in fields))
            return lambda: out
        copies = SamplerOutput(*(None if t is None else t.to("cpu", non_blocking=True)
                                 for t in fields))
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.token_ids.device))

        def wait() -> SamplerOutput:
            ready.synchronize()
            return copies
        return wait


# -- counter-based noise --------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def row_keys(seeds: Sequence[int], positions: Sequence[int]) -> list[int]:
    """64-bit key per row from (seed, absolute position)."""
    return [
        _splitmix64(_splitmix64(int(s) & _M64) ^ (int(p) & _M64)) for s, p in zip(seeds, positions)
    ]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x * c mod 2^32 without int64 overflow: split c into 16-bit halves.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (C. Wellons): a good 32-bit permutation.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(keys: Sequence[int], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """float32 [len(keys), vocab] standard Gumbel noise, a pure function of (key, token)."""
    halves = np.array([[key & 0xFFFFFFFF, key >> 32] for key in keys], dtype=np.int64)
    k = to_device(halves.reshape(len(keys), 2), torch.device(device))
    v = torch.arange(vocab_size, dtype=torch.int64, device=device)[None, :]
    h = _mix32(_mix32(v ^ k[:, :1]) ^ k[:, 1:])
    # 23 bits + 0.5 stays exactly representable in float32, so u < 1 strictly:
    # with 24 bits the top value rounded to 1.0, the noise became +inf and a
    # masked (-inf) token could win the argmax as NaN.
    u = ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))  # in (0, 1)
    return -torch.log(-torch.log(u))


# -- masks and processors -----------------------------------------------------------


def _apply_repetition_penalty(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prev_tokens: Sequence[Sequence[int] | np.ndarray],
) -> torch.Tensor:
    rows, toks, pens = [], [], []
    vocab = logits.shape[1]
    for r, (p, prev) in enumerate(zip(params, prev_tokens)):
        if p.repetition_penalty == 1.0 or prev is None or len(prev) == 0:
            continue
        t = np.unique(np.asarray(prev, dtype=np.int64))
        t = t[(t >= 0) & (t < vocab)]
        rows.append(np.full(len(t), r, dtype=np.int64))
        toks.append(t)
        pens.append(np.full(len(t), p.repetition_penalty, dtype=np.float32))
    if not rows:
        return logits
    dev = logits.device
    r = to_device(np.concatenate(rows), dev)
    t = to_device(np.concatenate(toks), dev)
    pen = to_device(np.concatenate(pens), dev)
    score = logits[r, t]
    logits = logits.clone()
    logits[r, t] = torch.where(score < 0, score * pen, score / pen)
    return logits


def _filter(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """top-k, then top-p on what is left, then min-p; filtered tokens -> -inf."""
    vocab, dev = x.shape[1], x.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    # top_p = 1 disables the filter outright: a float32 cumsum can reach 1.0
    # before the tail, which would otherwise drop tail tokens.
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    if any(k < vocab for k in top_k) or any(tp < 1.0 for tp in top_p):
        sx, idx = x.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        k_dev = to_device(np.asarray(top_k, dtype=np.int64), dev)
        sx = sx.masked_fill(rank >= k_dev[:, None], float("-inf"))
        probs = sx.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        # transformers' rule: drop a token once the mass above it reaches top_p;
        # rank 0 never drops (`before` is 0 there and top_p > 0).
        p_dev = to_device(np.asarray(top_p, dtype=np.float32), dev).to(probs.dtype)
        drop = before >= p_dev[:, None]
        sx = sx.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(1, idx, sx)
    min_p = [p.min_p for p in params]
    if any(m > 0 for m in min_p):
        probs = x.softmax(-1)
        m_dev = to_device(np.asarray(min_p, dtype=np.float32), dev).to(probs.dtype)
        floor = m_dev[:, None] * probs.amax(-1, keepdim=True)
        x = x.masked_fill(probs < floor, float("-inf"))
    return x


def top_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams],
                 logprobs: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The top-n alternatives of the rows that ask (`SamplingParams.logprobs`).

    Returns (ids int64 [B, n], logprobs float32 [B, n]) with n the largest
    count asked, or (None, None) when no row asks. Row r holds its best
    `params[r].logprobs` tokens under `log_softmax(logits[r])`, best first
    (ties to the lower id, as `topk`); the rest of the row is (-1, -inf).
    The log-softmax is computed for the asking rows only, unless `logprobs`
    (the whole batch's, already computed) is given.
    """
    counts = [min(p.logprobs, logits.shape[1]) for p in params]
    n = max(counts, default=0)
    if n == 0:
        return None, None
    b, dev = logits.shape[0], logits.device
    rows = [r for r, c in enumerate(counts) if c > 0]
    # (Asynchronous copies: a pageable one would wait for the queued forward.)
    idx = to_device(np.asarray(rows, dtype=np.int64), dev)
    lp = logprobs[idx] if logprobs is not None else torch.log_softmax(logits[idx].float(), -1)
    vals, ids = lp.topk(n, dim=-1)
    # Rows asking for fewer than n keep their first counts[r] entries.
    asked = to_device(np.asarray([counts[r] for r in rows], dtype=np.int64), dev)
    keep = torch.arange(n, device=dev)[None, :] < asked[:, None]
    out_ids = torch.full((b, n), -1, dtype=torch.int64, device=dev)
    out_lps = torch.full((b, n), float("-inf"), dtype=torch.float32, device=dev)
    out_ids[idx] = ids.masked_fill(~keep, -1)
    out_lps[idx] = vals.float().masked_fill(~keep, float("-inf"))
    return out_ids, out_lps


# -- the sampler --------------------------------------------------------------------


class Sampler:
    """Stateless per row except for the random keys of unseeded rows.

    `kernels.fused_sampling` lets CUDA batches take the fused kernel (the
    engine passes its runner's config; default: allowed)."""

    def __init__(self, seed: int | None = None, *, kernels: KernelConfig | None = None) -> None:
        self._rng = random.Random(seed)
        self.kernels = kernels if kernels is not None else KernelConfig()

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        positions: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        prev_tokens: Sequence[Sequence[int] | np.ndarray] | None = None,
        allowed: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Pick one token per row.

        Args:
            logits: float [B, V] next-token logits.
            params: one SamplingParams per row.
            positions: per row, the absolute position the sampled token will
                occupy (the sequence length before it); keys the seeded noise.
            prev_tokens: per row, the tokens the repetition penalty counts
                (prompt + generated, as transformers); only read for rows
                with a penalty != 1.
            allowed: optional allowed-token mask, packed int32 [B, ceil(V'/32)]
                (llguidance, see `dendrite.grammar.unpack_bitmask`) or bool [B, V'];
                ids past its width are disallowed.
        """
        b, vocab = logits.shape
        if len(params) != b:
            raise ValueError(f"{len(params)} SamplingParams for {b} rows")
        if self._fusable(logits, params, prev_tokens, allowed):
            return self._fused(logits, params, positions, allowed)
        logits = logits.float()
        logprobs_all = torch.log_softmax(logits, dim=-1)
        x = logits
        if prev_tokens is not None:
            x = _apply_repetition_penalty(x, params, prev_tokens)
        if allowed is not None:
            # (Imported here: unmasked sampling needs no llguidance.)
            from dendrite.grammar.masks import unpack_bitmask

            x = x.masked_fill(
                ~unpack_bitmask(allowed.to(x.device, non_blocking=True), vocab), float("-inf")
            )

        tokens = x.argmax(dim=-1)
        sampled = [r for r, p in enumerate(params) if not p.greedy]
        if sampled:
            sp = [params[r] for r in sampled]
            keys = self._keys(params, positions, sampled)
            rows = to_device(np.asarray(sampled, dtype=np.int64), x.device)
            with np.errstate(over="ignore"):  # a temperature past float32 is inf, as in torch
                t32 = np.asarray([p.temperature for p in sp], dtype=np.float32)
            temps = to_device(t32, x.device)[:, None]
            xs = _filter(x[rows] / temps, sp)
            tokens[rows] = (xs + gumbel_noise(keys, vocab, x.device)).argmax(dim=-1)

        chosen = logprobs_all.gather(1, tokens[:, None]).squeeze(1)
        top_ids, top_lps = top_logprobs(logits, params, logprobs_all)
        return SamplerOutput(tokens, chosen, top_ids, top_lps)

    def _keys(self, params: Sequence[SamplingParams],
              positions: Sequence[int] | np.ndarray | torch.Tensor,
              rows: list[int]) -> list[int]:
        """Noise keys of the sampled `rows`; unseeded rows draw a fresh seed, in row order."""
        pos = positions.tolist() if hasattr(positions, "tolist") else list(positions)
        seeds = [params[r].seed if params[r].seed is not None else self._rng.getrandbits(64)
                 for r in rows]
        return row_keys(seeds, [pos[r] for r in rows])

    def _fusable(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 prev_tokens: object, allowed: torch.Tensor | None) -> bool:
        """The one-pass CUDA kernel covers masks, temperature and seeded noise
        (top-n logprobs are added from the rows that ask); penalties, top-k/p
        and min-p stay on the torch path."""
        if not logits.is_cuda or (allowed is not None and allowed.dtype != torch.int32):
            return False
        if not fusable_params(params, logits.shape[1]):
            return False
        from dendrite.kernels.sample import fused_sampling_available

        return fused_sampling_available(self.kernels)

    def _fused(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               positions: Sequence[int] | np.ndarray | torch.Tensor,
               allowed: torch.Tensor | None) -> SamplerOutput:
        from dendrite.kernels.sample import fused_sample, pack_row_params

        sampled = [r for r, p in enumerate(params) if not p.greedy]
        keys = [0] * len(params)
        for r, k in zip(sampled, self._keys(params, positions, sampled)):
            keys[r] = k
        temps = [p.temperature for p in params]
        dev = logits.device
        row_params = to_device(pack_row_params(keys, temps), dev)
        mask = allowed.to(dev, non_blocking=True) if allowed is not None else None
        logits = logits.float()
        tokens, logprobs = fused_sample(logits, row_params, mask)
        top_ids, top_lps = top_logprobs(logits, params)
        return SamplerOutput(tokens, logprobs, top_ids, top_lps)


def fusable_params(params: Sequence[SamplingParams], vocab_size: int) -> bool:
    """Whether the fused kernel covers every row's parameters (see `Sampler`):
    no repetition penalty, top-k, top-p or min-p; top-n logprobs are fine."""
    return not any(p.repetition_penalty != 1.0 or 0 < p.top_k < vocab_size or p.top_p < 1.0
                   or p.min_p > 0.0 for p in params)


_default_sampler = Sampler()


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    positions: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    prev_tokens: Sequence[Sequence[int] | np.ndarray] | None = None,
    allowed: torch.Tensor | None = None,
) -> SamplerOutput:
    """`Sampler()(...)` with a process-wide sampler (see `Sampler.__call__`)."""
    return _default_sampler(logits, params, positions, prev_tokens=prev_tokens, allowed=allowed)
