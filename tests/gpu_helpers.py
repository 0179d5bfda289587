"""Shared helpers for the GPU tests: a page allocator, step drivers, HF greedy.

The allocator hands each sequence its own pages (no forks): the GPU tests
exercise the kernels and the graphs, the KV tree has its own tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from dendrite.attention.base import build_attention_metadata


@dataclass
class _Seq:
    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0


class Pager:
    """Per-sequence page lists over `num_pages`, handed out in shuffled order.

    Shuffled so that a sequence's pages are not contiguous in the pool (a
    kernel that ignored the page table would read the wrong tokens). Page
    `num_pages - 1` is never handed out: the CUDA-graph runner pads with it.
    """

    def __init__(self, num_pages: int, page_size: int, seed: int = 0) -> None:
        self.page_size = page_size
        rng = np.random.default_rng(seed)
        self.free = [int(p) for p in rng.permutation(num_pages - 1)]
        self.seqs: list[_Seq] = []

    def new(self) -> int:
        self.seqs.append(_Seq())
        return len(self.seqs) - 1

    def step(self, batch: list[tuple[int, list[int]]], device: str | torch.device):
        """Append tokens to sequences; returns (input_ids int64 [T], meta)."""
        ids, pos, slots, qo, kvp, kvi, last = [], [], [], [0], [0], [], []
        ps = self.page_size
        for sid, toks in batch:
            s = self.seqs[sid]
            for t in toks:
                if s.num_tokens % ps == 0:
                    s.pages.append(self.free.pop())
                slots.append(s.pages[-1] * ps + s.num_tokens % ps)
                pos.append(s.num_tokens)
                ids.append(int(t))
                s.num_tokens += 1
            qo.append(len(ids))
            kvi += s.pages
            kvp.append(len(kvi))
            last.append(s.num_tokens - (len(s.pages) - 1) * ps)
        meta = build_attention_metadata(pos, slots, qo, kvp, kvi, last, page_size=ps,
                                        device=device)
        return torch.tensor(ids, dtype=torch.int64, device=device), meta


def hf_greedy(model_dir, prompts: list[list[int]], n_new: int, dtype: torch.dtype,
              device: str = "cuda") -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and their float32 logits for each prompt."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    gc = transformers.GenerationConfig(max_new_tokens=n_new, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            # An explicit all-ones mask: otherwise generate() masks prompt
            # tokens equal to pad_token_id (the tiny tokenizer's BOS is id 0).
            r = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=gc,
                            output_logits=True, return_dict_in_generate=True)
            out.append((r.sequences[0, len(ids):].tolist(), torch.cat(r.logits).float()))
    del hf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def hf_teacher_forced(model_dir, prompts: list[list[int]], continuations: list[list[int]],
                      dtype: torch.dtype, device: str = "cuda") -> list[torch.Tensor]:
    """transformers' float32 logits predicting each continuation token (one forward each)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, continuations):
            x = torch.tensor([p + c[:-1]], device=device)
            lg = hf(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
            out.append(lg[len(p) - 1:])
    del hf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def teacher_forced_logits(runner, prompts: list[list[int]], continuations: list[list[int]],
                          chunks: list[int], starts: list[int], seed: int = 0
                          ) -> list[torch.Tensor]:
    """Logits predicting each continuation token, all sequences batched per step.

    Prompts are prefilled in chunks of `chunks[j]` tokens from step
    `starts[j]`, so early steps mix prefill chunks with decode rows; then each
    sequence is fed its continuation one token per step (teacher forcing), so
    later steps are pure decode. Row j of the result predicts continuation
    token j (the first from the full prompt).
    """
    pager = Pager(runner.num_pages, runner.page_size, seed)
    sids = [pager.new() for _ in prompts]
    pending = [list(p) for p in prompts]
    fed = [0] * len(prompts)  # continuation tokens fed so far
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    step = 0
    while any(len(lg) < len(c) for lg, c in zip(logits, continuations)):
        batch, who = [], []
        for j, sid in enumerate(sids):
            if step < starts[j] or len(logits[j]) == len(continuations[j]):
                continue
            if pending[j]:
                toks, pending[j] = pending[j][:chunks[j]], pending[j][chunks[j]:]
            else:
                toks, fed[j] = [continuations[j][fed[j]]], fed[j] + 1
            batch.append((sid, toks))
            who.append(j)
        ids, meta = pager.step(batch, runner.device)
        out = runner.run(ids, meta)
        for row, j in enumerate(who):
            if not pending[j]:
                logits[j].append(out[row].float())
        step += 1
    return [torch.stack(lg) for lg in logits]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row max |a - b| / max |b| (rows = positions)."""
    return (a - b).abs().amax(-1) / b.abs().amax(-1)


def report(name: str, **fields) -> None:
    """Append one JSON line to $DENDRITE_REPORT_DIR/gpu_tests.jsonl (if set) and print it."""
    line = json.dumps({"test": name, **fields})
    print(line)
    d = os.environ.get("DENDRITE_REPORT_DIR")
    if d:
        with open(os.path.join(d, "gpu_tests.jsonl"), "a") as f:
            f.write(line + "\n")
