"""Model loading and math for Llama-family checkpoints over Dendrite's paged KV."""

from dendrite.model.config import (
    MissingFileError,
    ModelConfig,
    ModelLoadError,
    UnsupportedModelError,
)
from dendrite.model.kv_cache import KVCache
from dendrite.model.llama import LlamaForCausalLM
from dendrite.model.loader import (
    LoadedModel,
    load,
    load_config,
    load_model,
    load_tokenizer,
)
from dendrite.model.runner import ModelRunner
from dendrite.model.tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "ChatTemplateError",
    "KVCache",
    "LlamaForCausalLM",
    "LoadedModel",
    "MissingFileError",
    "ModelConfig",
    "ModelLoadError",
    "ModelRunner",
    "Tokenizer",
    "UnsupportedModelError",
    "load",
    "load_config",
    "load_model",
    "load_tokenizer",
]
