"""Attention backends over the paged KV cache: the contract, a torch reference, FlashInfer."""

from dendrite.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    HostMetadata,
    build_attention_metadata,
)

__all__ = ["AttentionBackend", "AttentionMetadata", "HostMetadata", "build_attention_metadata"]
