"""asv benchmarks of the engine on the CPU, through the public API.

A tiny random-weight Llama (built once per asv run by `setup_cache`) keeps
the model's share small, so regressions in the host work of a step (the
scheduler, the tree, metadata, sampling, grammar masks) show up in
`asv continuous`. Figures are wall time of whole calls as a user makes them.
"""

import tempfile

import torch

from dendrite.engine import Engine
from dendrite.sampling import SamplingParams
from dendrite.tiny_model import build_tiny_model

PROMPT = "Question: Natalia sold clips to 48 of her friends in April, and then she sold"


def _engine(model_dir):
    torch.set_num_threads(1)
    return Engine(model_dir, device="cpu", num_pages=16384, lookahead=False)


class EngineStep:
    """One decode step with `branches` leaves forked from a 256-token prompt."""

    params = [1, 16]
    param_names = ["branches"]
    timeout = 120

    def setup_cache(self):
        return str(build_tiny_model(tempfile.mkdtemp(prefix="dendrite-asv-"), "llama", seed=0))

    def setup(self, model_dir, branches):
        self.engine = _engine(model_dir)
        root = self.engine.new_sequence([1 + i % 250 for i in range(256)])
        self.kids = root.fork(branches)
        self.handles = [self.engine.submit(k, SamplingParams(temperature=0.8, seed=i,
                                                             max_tokens=10_000, ignore_eos=True))
                        for i, k in enumerate(self.kids)]
        self.engine.step()  # the prefill: later steps are steady decode

    def teardown(self, model_dir, branches):
        self.engine.close()

    def time_decode_step(self, model_dir, branches):
        self.engine.step()


class ForkGenerate:
    """Fork a prompt 8 ways and generate 16 tokens on each (best-of-8)."""

    timeout = 120

    def setup_cache(self):
        return str(build_tiny_model(tempfile.mkdtemp(prefix="dendrite-asv-"), "llama", seed=0))

    def setup(self, model_dir):
        self.engine = _engine(model_dir)

    def teardown(self, model_dir):
        self.engine.close()

    def time_fork_and_generate_8x16(self, model_dir):
        root = self.engine.new_sequence(PROMPT)
        kids = root.fork(8)
        self.engine.generate(kids, [SamplingParams(temperature=0.8, seed=i, max_tokens=16,
                                                   ignore_eos=True) for i in range(8)])
        for k in kids:
            k.release()
        root.release()


class GrammarMasks:
    """Allowed-token masks of 16 branches under one JSON schema (llguidance)."""

    timeout = 120

    def setup_cache(self):
        return str(build_tiny_model(tempfile.mkdtemp(prefix="dendrite-asv-"), "llama", seed=0))

    def setup(self, model_dir):
        from dendrite.grammar import Constraint, fill_masks

        self.engine = _engine(model_dir)
        tok = self.engine.grammar_tokenizer
        schema = {"type": "object", "properties": {"name": {"type": "string"},
                                                   "age": {"type": "integer"}},
                  "required": ["name", "age"]}
        constraint = Constraint(json_schema=schema)
        constraint.compile(tok)
        self.matchers = [constraint.matcher(tok) for _ in range(16)]
        self.bitmask = torch.full((16, tok.mask_words), -1, dtype=torch.int32)
        self.fill = fill_masks

    def teardown(self, model_dir):
        self.engine.close()

    def time_fill_16_masks(self, model_dir):
        self.fill(self.matchers, self.bitmask)
