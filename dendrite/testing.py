"""Build tiny HuggingFace-format model directories, deterministically.

Tests, benchmarks and the offline default model need a real model directory
(config.json, safetensors weights, tokenizer.json, generation_config.json) but
no hub can be reached. This module trains a small byte-level BPE tokenizer with
`tokenizers` on a fixed corpus and writes random weights with `safetensors`,
all from a seed, so the same call always yields the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|user|>", "<|assistant|>"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A tree of thought explores many
continuations of one context; each branch shares the prefix it came from.
Question: Natalia sold clips to 48 of her friends in April, and then she sold
half as many clips in May. How many clips did Natalia sell altogether?
Answer: 48 / 2 = 24 clips in May. 48 + 24 = 72 clips. The answer is 72.
{"name": "Ada", "age": 36, "tags": ["math", "engines"], "ok": true, "x": null}
[1, 2, 3.5, -4e10] {"a": {"b": [{"c": "d"}]}} true false null 0123456789
Let's think step by step. First, second, third. Yes or no? red green blue.
def fork(node, n): return [child(node) for _ in range(n)]  # O(1) each
SELECT * FROM branches WHERE score > 0.5 ORDER BY value DESC LIMIT 4;
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on the fixed corpus and save it.

    Byte-level with the full 256-byte alphabet, so every string encodes; writes
    tokenizer.json and tokenizer_config.json (with a chat template).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 4096,
            },
            indent=2,
        )
    )
    return out
