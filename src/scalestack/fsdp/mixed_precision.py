"""Mixed precision policy, named and shaped like FSDP2's ``MixedPrecisionPolicy``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MixedPrecision:
    """Compute in ``param_dtype``, reduce gradients in ``reduce_dtype``; the shard stays in its own dtype.

    ``None`` means "the parameters' own dtype". ``cast_forward_inputs`` casts floating-point forward
    inputs of each unit to ``param_dtype``.
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True

    def __post_init__(self) -> None:
        for field in ("param_dtype", "reduce_dtype"):
            value = getattr(self, field)
            if value is not None and value not in _FLOATS:
                raise ValueError(f"MixedPrecision.{field} must be a floating-point torch.dtype, got {value!r}")
