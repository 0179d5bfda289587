"""Server settings: API keys, limits and handle lifetime."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    """What `create_app` needs besides the engine.

    Every limit answers a client that exceeds it with a 4xx naming the limit,
    never with a crash: see docs/server.md.
    """

    api_keys: tuple[str, ...] = ()  # empty: no auth, every client is the anonymous key ""
    model_name: str | None = None  # the id /v1/models reports (default: the model dir name)
    max_request_bytes: int = 1 << 20  # a larger body -> 413
    max_tokens: int = 4096  # the largest `max_tokens` a request may ask for
    max_prompt_tokens: int | None = None  # None: what the KV pool and the model's context allow
    max_handles_per_key: int = 64  # live fork handles one key may hold -> 429 above
    max_fork: int = 64  # largest fork fan-out, and largest `n`
    handle_ttl: float = 600.0  # seconds a handle lives after its last use
    max_handle_ttl: float = 86400.0  # the largest `ttl` a client may ask for
    max_program_seconds: float = 300.0  # a /v1/programs/run that runs longer is aborted
    default_max_tokens: int = 16  # OpenAI's default for completions
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_tokens", "max_handles_per_key", "max_fork"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.handle_ttl <= 0:
            raise ValueError(f"handle_ttl must be > 0, got {self.handle_ttl}")
