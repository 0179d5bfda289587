"""Tokenizer of a local HF model dir: tokenizer.json through `tokenizers`.

Special tokens come from tokenizer_config.json, then generation_config.json and
config.json (eos may be a list there). Chat templates are optional: they render
with jinja2 when it is installed (it is not a Dendrite dependency), and
`apply_chat_template` raises a clear error otherwise.

A missing or unreadable tokenizer.json, or a JSON file of the directory that
does not parse, raises `ModelLoadError` naming the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dendrite.model.errors import MissingFileError, ModelLoadError
from dendrite.model.jsonfile import read_json_object

__all__ = ["ChatTemplateError", "Tokenizer"]


class ChatTemplateError(ModelLoadError):
    """No chat template, or no jinja2 to render it."""


def _token_str(t: Any) -> str | None:
    # tokenizer_config stores special tokens as str or as AddedToken dicts.
    if isinstance(t, dict):
        return t.get("content")
    return t


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, optional=True)


def _load_backend(path: Path) -> Any:
    """`tokenizers.Tokenizer` from `path`, or ModelLoadError naming the file."""
    from tokenizers import Tokenizer as _HFTokenizer

    try:
        return _HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception for bad files
        # Its serde message ("expected value at line 1 column 1") is one line;
        # keep it, without the serde internals some versions append.
        what = re.sub(r"\s+", " ", str(e)).strip() or type(e).__name__
        raise ModelLoadError(f"{path}: not a valid tokenizer file: {what}") from None


class Tokenizer:
    """Encode/decode plus the special ids and chat template of a model dir.

    `backend` is the underlying `tokenizers.Tokenizer` (llguidance builds its
    token table from it).
    """

    def __init__(
        self,
        model_dir: str | Path,
        eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
    ) -> None:
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            extra = (
                " (only tokenizer.json is supported, not tokenizer.model)"
                if (d / "tokenizer.model").is_file()
                else ""
            )
            raise MissingFileError(f"missing tokenizer file {path}{extra}")
        self.backend = _load_backend(path)
        cfg = _read_json(d / "tokenizer_config.json")
        self.config = cfg

        def tid(name: str) -> int | None:
            s = _token_str(cfg.get(name))
            return self.backend.token_to_id(s) if s is not None else None

        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.bos_token_id = tid("bos_token") if self.bos_token is not None else bos_token_id
        self.pad_token_id = tid("pad_token")
        eos = [tid("eos_token")] if self.eos_token is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in [*eos, *eos_token_ids] if i is not None)
        )
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.chat_template = self._find_chat_template(d, cfg)

    @staticmethod
    def _find_chat_template(d: Path, cfg: dict[str, Any]) -> str | None:
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl}
            tpl = named.get("default") or next(iter(named.values()), None)
        if tpl is None and (d / "chat_template.jinja").is_file():
            tpl = (d / "chat_template.jinja").read_text()
        if tpl is None and (d / "chat_template.json").is_file():
            tpl = _read_json(d / "chat_template.json").get("chat_template")
        return tpl

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (may be < the model's)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def num_ids(self) -> int:
        """Largest token id + 1: the embedding rows the tokenizer can index."""
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with `add_special_tokens`, the tokenizer's post-processor
        runs and BOS is prepended when tokenizer_config asks for it."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens dropped unless asked)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary string of one id, or None when out of range."""
        return self.backend.id_to_token(i)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's chat template (HF semantics)."""
        if self.chat_template is None:
            raise ChatTemplateError("this model directory has no chat template")
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise ChatTemplateError(
                "rendering a chat template needs jinja2 (pip install jinja2); pass raw text instead"
            ) from e

        def raise_exception(msg: str) -> None:
            raise jinja2.exceptions.TemplateError(msg)

        def strftime_now(fmt: str) -> str:
            from datetime import datetime

            return datetime.now().strftime(fmt)

        # Same environment options transformers uses, so templates render alike.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
            x, indent=indent, ensure_ascii=False
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
