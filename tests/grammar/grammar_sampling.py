"""Random-logits sampling loop for grammar tests (stands in for the engine).

A real sampling loop over *random* logits (seeded), with the grammar mask
applied before sampling and forced tokens appended without sampling. Random
logits are adversarial for a grammar; if the masks alone keep every output
valid here, they will with a model too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dendrite.grammar import GrammarTokenizer, Matcher, apply_masks, fill_masks, grammar_status

# Model logits width, padded past the tokenizer's 512 ids as real models do:
# padded ids must never be sampled.
MODEL_VOCAB = 520


@dataclass
class Gen:
    """One branch of a generation: its matcher, tokens and finish reason."""

    matcher: Matcher
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    forced: int = 0

    @property
    def status(self) -> str:
        return grammar_status(self.matcher, self.finish or "length")


def closing_bias(gtok: GrammarTokenizer, strength: float) -> torch.Tensor:
    """Logit bias toward EOS and tokens that close JSON strings/containers.

    Random logits would otherwise wander: a string ends only when `"` is
    drawn out of hundreds of allowed tokens. Biasing closers keeps most
    generations short enough to complete under max_tokens.
    """
    bias = torch.zeros(MODEL_VOCAB)
    for i in range(gtok.tokenizer_vocab_size):
        text = gtok.ll.decode_bytes([i])
        if i in gtok.eos_token_ids or any(c in text for c in (b'"', b"}", b"]")):
            bias[i] = strength
    return bias


def run(
    gens: list[Gen],
    gtok: GrammarTokenizer,
    gen: torch.Generator,
    *,
    max_tokens: int,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    fork_at: int | None = None,
    fork_n: int = 1,
) -> list[Gen]:
    """Sample every branch to EOS or max_tokens; returns all branches.

    At step `fork_at`, each unfinished branch is replaced by `fork_n`
    children (matcher forked, tokens copied) that continue with their own
    random draws.
    """
    gens = list(gens)
    step = 0
    while True:
        if fork_at is not None and step == fork_at:
            grown: list[Gen] = []
            for g in gens:
                if g.finish is None:
                    grown += [
                        Gen(m, list(g.tokens), None, g.forced) for m in g.matcher.fork_many(fork_n)
                    ]
                else:
                    grown.append(g)
            gens = grown
        step += 1
        # Forced tokens go in without sampling (the engine prefills them).
        for g in gens:
            if g.finish is None:
                ff = g.matcher.forced_tokens()[: max_tokens - len(g.tokens)]
                if ff:
                    g.matcher.consume_many(ff)
                    g.tokens += ff
                    g.forced += len(ff)
                    if len(g.tokens) >= max_tokens:
                        g.finish = "length"
        active = [g for g in gens if g.finish is None]
        if not active:
            return gens
        bitmask = gtok.allocate_bitmask(len(active))
        fill_masks([g.matcher for g in active], bitmask)
        logits = torch.randn(len(active), MODEL_VOCAB, generator=gen) * 2.0
        if bias is not None:
            logits += bias
        apply_masks(logits, bitmask)
        # Gumbel-max: an exact draw from softmax(logits / T), cheaper than
        # softmax + multinomial; -inf (masked) logits can never win.
        u = torch.rand(logits.shape, generator=gen).clamp_(min=1e-20)
        picks = (logits / temperature - torch.log(-torch.log(u))).argmax(dim=-1).tolist()
        for g, t in zip(active, picks):
            assert t < gtok.tokenizer_vocab_size, f"padded id {t} sampled"
            g.matcher.consume(t)  # raises GrammarViolation if the mask let a bad token through
            g.tokens.append(t)
            if t in gtok.eos_token_ids:
                g.finish = "eos"
            elif len(g.tokens) >= max_tokens:
                g.finish = "length"
