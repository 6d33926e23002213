"""Context parallelism: a sequence sharded head-tail over a group of ranks, attention that all-gathers K/V
with its own backward, and the plumbing that shards ids, labels and positions the same way."""

from .attention import context_parallel_attention
from .kernel import attention_backward, attention_forward
from .sharding import (
    document_ids,
    pad_to_multiple,
    shard_sequence,
    unshard,
    zigzag_order,
    zigzag_positions,
)

__all__ = ["attention_backward", "attention_forward", "context_parallel_attention", "document_ids",
           "pad_to_multiple", "shard_sequence", "unshard", "zigzag_order", "zigzag_positions"]  # fmt: skip
