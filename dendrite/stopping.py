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
                 stop_token_ids: Iterable[int] = (), eos_token_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [stop] if isinstance(stop, str) else [s for s in stop if s]
        self.stop_token_ids = set(int(t) for t in stop_token_ids)
        self.eos_token_ids = set(int(t) for t in eos_token_ids)
        # A token decodes to at least one character (byte-level BPE may need a
        # few tokens per character): a window of 4 tokens per character plus
        # slack always covers the longest stop string.
        self._window = 4 * max((len(s) for s in self.stop), default=0) + 4
        self.matched: str | None = None

    def check(self, token_ids: list[int]) -> str | None:
        """None to go on, else "eos" or "stop" after the newest token."""
        last = token_ids[-1]
        if last in self.eos_token_ids:
            return "eos"
        if last in self.stop_token_ids:
            return "stop"
        if self.stop:
            tail = self.tokenizer.decode(token_ids[-self._window:], skip_special_tokens=False)
            for s in self.stop:
                if s in tail:
                    self.matched = s
                    return "stop"
        return None

    def final_text(self, token_ids: list[int]) -> str:
        """The generated text, cut before the stop string that ended it."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if self.matched is not None:
            cut = text.find(self.matched)
            if cut >= 0:
                text = text[:cut]
        return text
