"""Model factories and loading helpers."""

from taxfree.models.tiny import tiny_llama_config, tiny_llama

__all__ = ["tiny_llama_config", "tiny_llama"]
