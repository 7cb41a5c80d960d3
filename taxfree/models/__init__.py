"""Model factories and loading helpers.

`tiny_llama` and `tiny_llama_config` import transformers' Llama modeling code, so they are
loaded on first use: `taxfree validate` and the input checks need only `taxfree.models.load`.
"""

__all__ = ["tiny_llama_config", "tiny_llama"]


def __getattr__(name):
    if name in __all__:
        from taxfree.models import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module 'taxfree.models' has no attribute {name!r}")
