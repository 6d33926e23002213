"""Context parallelism: a sequence sharded head-tail over a group of ranks, attention that all-gathers K/V
with its own backward, and the plumbing that shards ids, labels and positions the same way."""

from .apply import apply_context_parallel
from .attention import context_parallel_attention
from .checkpointing import checkpoint_blocks, checkpoint_keeping_attention
from .flash import FLASH, flash_backward, flash_forward
from .kernel import MATMUL, SegmentMask, attention_backward, attention_forward
from .loss import chunked_cross_entropy, global_mean_loss
from .sharding import (
    Layout,
    document_head_tail_layout,
    document_ids,
    head_tail_layout,
    pad_to_multiple,
    shard_sequence,
    unshard,
    zigzag_order,
    zigzag_positions,
)

__all__ = [
    "FLASH", "MATMUL", "Layout", "SegmentMask", "apply_context_parallel", "attention_backward", "attention_forward",
    "checkpoint_blocks", "checkpoint_keeping_attention", "chunked_cross_entropy", "context_parallel_attention",
    "document_head_tail_layout", "document_ids", "flash_backward", "flash_forward", "global_mean_loss",
    "head_tail_layout", "pad_to_multiple", "shard_sequence", "unshard", "zigzag_order", "zigzag_positions",
]  # fmt: skip
