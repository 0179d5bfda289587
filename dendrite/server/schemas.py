"""Request bodies (pydantic, strict: wrong types and unknown fields are refused)
and their translation to engine objects (`SamplingParams`, `Constraint`)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from dendrite.sampling import SamplingParams
from dendrite.server.config import ServerConfig
from dendrite.server.errors import ApiError

# Seeds are hashed as int64 by the sampler.
_SEED_MAX = (1 << 63) - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """``stream_options``: whether the last streamed chunk carries usage."""
    include_usage: bool = False


class JsonSchemaSpec(_Strict):
    """``response_format.json_schema``: a named JSON schema."""
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(_Strict):
    """``response_format``: text, JSON, a JSON schema, or the regex/grammar extensions."""
    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaSpec | None = None
    regex: str | None = None  # extension: type "regex"
    grammar: str | None = None  # extension: type "grammar" (lark, llguidance dialect)


class SamplingFields(_Strict):
    """Fields every generating endpoint shares."""

    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1  # extension
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # extension
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # extension
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = Field(default=None, ge=0, le=_SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    regex: str | None = None  # extension: the output matches this regex
    grammar: str | None = None  # extension: the output follows this lark grammar
    ignore_eos: bool = False  # extension
    user: str | None = None


class CompletionRequest(SamplingFields):
    """Body of ``POST /v1/completions``."""
    model: str | None = None
    prompt: str | list[int]
    n: int = Field(default=1, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None


class TextPart(_Strict):
    """A text part of a chat message's content."""
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message of a chat request."""
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(SamplingFields):
    """Body of ``POST /v1/chat/completions``."""
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(default=1, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logit_bias: dict[str, float] | None = None


class SequenceCreate(_Strict):
    """POST /v1/sequences: a prompt (or chat messages) to keep as a handle."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    ttl: float | None = Field(default=None, gt=0)
    add_generation_prompt: bool = True


class SequenceFork(_Strict):
    """Body of ``POST /v1/sequences/{id}/fork``: how many children and their TTL."""
    n: int = Field(default=1, ge=1)
    ttl: float | None = Field(default=None, gt=0)


class SequenceGenerate(SamplingFields):
    """POST /v1/sequences/{id}/generate: `text` is appended first, then generation."""

    model: str | None = None
    text: str | list[int] | None = None
    n: int = Field(default=1, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ProgramRun(_Strict):
    """POST /v1/programs/run: a `.dendrite` script, its arguments and a run seed."""

    script: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    program: str | None = None
    seed: int | None = Field(default=0, ge=0, le=_SEED_MAX)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them (text parts joined)."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        d: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def sampling_params(req: SamplingFields, config: ServerConfig, n: int,
                    max_tokens: int | None = None, logprobs: int = 0) -> list[SamplingParams]:
    """One `SamplingParams` per choice; choice i of a seeded request uses seed + i,
    so `n=k, seed=s` draws what k requests with seeds s..s+k-1 draw."""
    if n > config.max_fork:
        raise ApiError(400, f"n={n} exceeds this server's limit of {config.max_fork}", param="n")
    if req.presence_penalty != 0.0 or req.frequency_penalty != 0.0:
        which = "presence_penalty" if req.presence_penalty != 0.0 else "frequency_penalty"
        raise ApiError(400, f"{which} is not supported (use repetition_penalty)", param=which)
    mt = max_tokens if max_tokens is not None else req.max_tokens
    if mt is None:
        mt = config.default_max_tokens
    if mt > config.max_tokens:
        raise ApiError(400, f"max_tokens={mt} exceeds this server's limit of {config.max_tokens}",
                       param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise ApiError(400, f"stop has {len(stop)} strings; at most 16", param="stop")
    if req.seed is not None and req.seed + n - 1 > _SEED_MAX:
        raise ApiError(400, "seed + n - 1 must fit in 63 bits", param="seed")
    out = []
    for i in range(n):
        seed = None if req.seed is None else req.seed + i
        try:
            out.append(SamplingParams(
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, seed=seed, max_tokens=mt,
                stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs))
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
    return out


def constraint_of(req: SamplingFields) -> tuple[Any, str | None]:
    """The llguidance `Constraint` a request asks for and the request field that
    gave it (for errors found later, when the engine compiles it for its
    tokenizer), or (None, None)."""
    from dendrite.grammar import Constraint, GrammarError

    specs = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            specs.append(("response_format", {"json_schema": {"type": "object"}}))
        elif rf.type == "json_schema":
            if rf.json_schema is None:
                raise ApiError(400, "response_format.json_schema is required when type is "
                                    "'json_schema'", param="response_format.json_schema")
            specs.append(("response_format.json_schema.schema",
                          {"json_schema": rf.json_schema.schema_}))
        elif rf.type == "regex":
            if rf.regex is None:
                raise ApiError(400, "response_format.regex is required when type is 'regex'",
                               param="response_format.regex")
            specs.append(("response_format.regex", {"regex": rf.regex}))
        else:
            if rf.grammar is None:
                raise ApiError(400, "response_format.grammar is required when type is 'grammar'",
                               param="response_format.grammar")
            specs.append(("response_format.grammar", {"grammar": rf.grammar}))
    if req.regex is not None:
        specs.append(("regex", {"regex": req.regex}))
    if req.grammar is not None:
        specs.append(("grammar", {"grammar": req.grammar}))
    if not specs:
        return None, None
    if len(specs) > 1:
        raise ApiError(400, "give at most one of response_format, regex, grammar; got "
                            + ", ".join(p for p, _ in specs), param=specs[1][0])
    [(param, kw)] = specs
    try:
        return Constraint(**kw), param
    except (GrammarError, TypeError, ValueError) as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None
