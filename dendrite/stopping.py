"""Stop conditions of one generation request: EOS, stop token ids, stop strings.

Stop strings can span token boundaries, so each check decodes only a short
tail of the generated tokens (long enough to hold the longest stop string) and
looks for a match there; the final text is cut before the first stop string,
as OpenAI-style APIs return it.
"""

from __future__ import annotations

from typing import Iterable, Protocol


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class StopChecker:
    """Decides, token by token, whether a request has finished and why."""

    def __init__(self, tokenizer: _Decoder, stop: str | Iterable[str] = (),
                 stop_token_ids: Iterable[int] = (), eos_token_ids: Iterable[int] = (),
                 include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = [stop] if isinstance(stop, str) else [s for s in stop if s]
        self.stop_token_ids = set(int(t) for t in stop_token_ids)
        self.eos_token_ids = set(int(t) for t in eos_token_ids)
        # A token decodes to at least one character (byte-level BPE may need a
        # few tokens per character): a window of 4 tokens per character plus
        # slack always covers the longest stop string.
        self._window = 4 * max((len(s) for s in self.stop), default=0) + 4
        self.include_stop = include_stop
        #: What ended the request: the stop string, or the stop token id; None
        #: when no stop matched (EOS, length, grammar...).
        self.matched: str | int | None = None

    def check(self, token_ids: list[int]) -> str | None:
        """None to go on, else "eos" or "stop" after the newest token."""
        last = token_ids[-1]
        if last in self.eos_token_ids:
            return "eos"
        if last in self.stop_token_ids:
            self.matched = last
            return "stop"
        if self.stop:
            tail = self.tokenizer.decode(token_ids[-self._window:], skip_special_tokens=False)
            for s in self.stop:
                if s in tail:
                    self.matched = s
                    return "stop"
        return None

    def final_text(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """The generated text, cut at the stop string that ended it (see `cut`)."""
        return self.cut(self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def cut(self, text: str) -> str:
        """``text`` (decoded generated tokens) cut before the matched stop string,
        or just after it with ``include_stop``; unchanged when none matched."""
        if isinstance(self.matched, str):
            k = text.find(self.matched)
            if k >= 0:
                return text[:k + len(self.matched)] if self.include_stop else text[:k]
        return text


class TextDeltas:
    """The text of a growing generation, handed out in pieces that are final.

    `feed` returns what may be shown now: never half of a multi-byte
    character (a trailing U+FFFD waits for the next token) and never text a
    stop string may still cut: a stop string found, or a tail that could be
    the start of one, waits. `finish` hands out the rest of the final text.
    The deltas join to the final text exactly.
    """

    def __init__(self, tokenizer: _Decoder, stop: Iterable[str] = (),
                 include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.shown = ""

    def feed(self, token_ids: list[int]) -> str:
        """All generated ids so far -> the new text safe to show ("" if none)."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        safe = len(text)
        for s in self.stop:
            k = text.find(s)
            if k >= 0:
                safe = min(safe, k + len(s) if self.include_stop else k)
            elif not self.include_stop:
                # A tail that may grow into `s` is held back; with
                # include_stop it would be shown anyway.
                for j in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:j]):
                        safe = min(safe, len(text) - j)
                        break
        return self._emit(text[:safe])

    def finish(self, final_text: str) -> str:
        """The part of ``final_text`` not handed out yet."""
        return self._emit(final_text)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.shown):
            return ""  # a decode that changed earlier text: nothing safe to add
        delta = text[len(self.shown):]
        self.shown = text
        return delta
