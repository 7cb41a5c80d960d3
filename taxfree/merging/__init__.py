"""Model averaging: streaming linear/partwise merges of safetensors checkpoints, and AMA.

    from taxfree.merging import merge_checkpoints, PartwiseWeights, AdaptiveModelAverager, train_ama

Convention: a two-model merge is `(1 - w) * sft + w * aligned`, `w` the aligned weight.
"""

from taxfree.merging.ama import AdaptiveModelAverager
from taxfree.merging.checkpoint import Checkpoint, InMemoryCheckpoint, ShardedWriter
from taxfree.merging.layers import classify, count_layers, layer_index
from taxfree.merging.merge import merge_checkpoints, write_merged
from taxfree.merging.plan import LayerRangeWeight, PartwiseWeights, parse_blocks

__all__ = [
    "AdaptiveModelAverager", "Checkpoint", "InMemoryCheckpoint", "LayerRangeWeight", "PartwiseWeights",
    "ShardedWriter", "classify", "count_layers", "layer_index", "merge_checkpoints", "parse_blocks",
    "train_ama", "write_merged",
]


def __getattr__(name):
    if name == "train_ama":  # imports transformers' schedulers: only when asked for
        from taxfree.merging.ama_training import train_ama

        return train_ama
    raise AttributeError(name)
