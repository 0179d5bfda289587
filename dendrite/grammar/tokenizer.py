"""The llguidance view of one model's tokenizer, with the vocab width of masks.

Built from a `tokenizers.Tokenizer` (or tokenizer.json) — never from a
transformers tokenizer, which Dendrite does not depend on at runtime. One
instance per model; it also owns the cache of compiled constraints, so a
constraint is compiled once per (spec, tokenizer).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llguidance
import torch

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger(__name__)


def _list_eos_supported() -> bool:
    """Whether `LLTokenizer(eos_token=[...])` takes several EOS ids (llguidance >= 1.7)."""
    return hasattr(llguidance.LLTokenizer, "eos_tokens")


# Module-level so tests can exercise the single-EOS path on a new llguidance.
LIST_EOS: bool = _list_eos_supported()


def _tokenizer_json(source: Any) -> str:
    """tokenizer.json text from a Tokenizer, a file/dir path, or JSON text."""
    if hasattr(source, "to_str"):
        text = source.to_str()
    elif isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
        path = Path(source)
        if path.is_dir():
            path = path / "tokenizer.json"
        text = path.read_text(encoding="utf-8")
    elif isinstance(source, str):
        text = source
    else:
        raise TypeError(f"expected tokenizers.Tokenizer, path or JSON, got {type(source)!r}")
    # llguidance re-tokenizes text with this tokenizer (for forced tokens);
    # padding/truncation settings would corrupt that, as in llguidance.hf.
    doc = json.loads(text)
    doc["padding"] = None
    doc["truncation"] = None
    return json.dumps(doc)


class GrammarTokenizer:
    """llguidance tokenizer for one model.

    Args:
        tokenizer: a `tokenizers.Tokenizer`, a path to tokenizer.json (or its
            directory), or the tokenizer.json text.
        eos_token_id: the model's EOS id(s); the grammar allows them exactly
            when the output so far is accepted.
        vocab_size: the model's logits width (embedding rows). Often padded
            larger than the tokenizer; padded ids are never allowed.
        cache_size: compiled constraints kept (LRU).

    Masks are `int32 [B, mask_words]`, bit `i % 32` of word `i // 32` set when
    token `i` is allowed; `vocab_size` is the width they cover.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer | str | os.PathLike[str],
        eos_token_id: int | Sequence[int],
        vocab_size: int | None = None,
        *,
        cache_size: int = 256,
    ) -> None:
        text = _tokenizer_json(tokenizer)
        eos = (
            [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
        )
        if not eos:
            raise ValueError("eos_token_id must name at least one token")
        eos = list(dict.fromkeys(eos))
        # llguidance < 1.7 takes one EOS id: it gets the first, and the
        # others become aliases of it (see `extra_eos_token_ids`).
        ll_eos: int | list[int] = eos if LIST_EOS else eos[0]
        probe = llguidance.LLTokenizer(text, eos_token=ll_eos)
        self.tokenizer_vocab_size: int = probe.vocab_size
        self.model_vocab_size: int = int(vocab_size) if vocab_size is not None else probe.vocab_size
        if self.model_vocab_size > probe.vocab_size:
            # Extend llguidance's vocab to the padded width: the extra ids
            # have no bytes, so llguidance never allows them, and the mask
            # row is exactly as wide as the logits row.
            self.ll = llguidance.LLTokenizer(text, n_vocab=self.model_vocab_size, eos_token=ll_eos)
        else:
            # A model narrower than its tokenizer: llguidance refuses to
            # shrink the vocab, so masks keep the tokenizer's width and
            # `apply_masks` ignores the ids the model cannot emit.
            self.ll = probe
        self.vocab_size: int = self.ll.vocab_size
        self.mask_words: int = (self.vocab_size + 31) // 32
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        # EOS ids llguidance does not know as EOS (old llguidance only):
        # masks allow them exactly when the primary EOS is allowed, and
        # matchers consume them as the primary EOS.
        self.extra_eos_token_ids: tuple[int, ...] = () if LIST_EOS else tuple(eos[1:])
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def allocate_bitmask(self, batch_size: int, *, pin_memory: bool | None = None) -> torch.Tensor:
        """An all-allowed `int32 [batch_size, mask_words]` CPU bitmask.

        Pinned when CUDA is available, so the copy to the device can overlap.
        """
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        return torch.full(
            (batch_size, self.mask_words), -1, dtype=torch.int32, pin_memory=pin_memory
        )

    def to_ll_tokens(self, token_ids: Sequence[int]) -> list[int]:
        """`token_ids` as llguidance knows them: extra EOS ids become the primary EOS."""
        ids = [int(t) for t in token_ids]
        if self.extra_eos_token_ids:
            extra, primary = self.extra_eos_token_ids, self.eos_token_ids[0]
            ids = [primary if t in extra else t for t in ids]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Bytes of `token_ids` as text (invalid UTF-8 replaced); EOS decodes to ''."""
        ids = [t for t in token_ids if t not in self.eos_token_ids]
        return self.ll.decode_str(ids)

    def compiled(self, key: str, build: Callable[[], llguidance.LLMatcher]) -> llguidance.LLMatcher:
        """Cached prototype matcher for `key`; `build()` makes it on a miss.

        The prototype is never advanced; matchers are deep copies of it, which
        share the compiled grammar and lexer (cheap) instead of rebuilding.
        """
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                return proto
        proto = build()  # outside the lock: compiling drops the GIL and may be slow
        with self._lock:
            self._cache[key] = proto
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return proto

    def forget(self, key: str) -> None:
        """Drop the compiled grammar `key` (its lexer hit a limit); recompiled on next use."""
        with self._lock:
            self._cache.pop(key, None)

    def __repr__(self) -> str:
        return (
            f"GrammarTokenizer(vocab_size={self.vocab_size}, "
            f"tokenizer_vocab_size={self.tokenizer_vocab_size}, eos={list(self.eos_token_ids)})"
        )
