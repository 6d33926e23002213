"""Mixed precision policy: FSDP2's ``MixedPrecisionPolicy``, same fields and meanings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MixedPrecisionPolicy:
    """Compute in ``param_dtype``, reduce gradients in ``reduce_dtype``; the shard stays in its own dtype.

    ``None`` means the parameters' own dtype (``reduce_dtype``: ``param_dtype``). ``output_dtype`` casts the
    floating-point outputs of each unit's forward; ``cast_forward_inputs`` casts its floating-point inputs
    to ``param_dtype``.
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    output_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True

    def __post_init__(self) -> None:
        for field in ("param_dtype", "reduce_dtype", "output_dtype"):
            value = getattr(self, field)
            if value is not None and value not in _FLOATS:
                raise ValueError(f"MixedPrecisionPolicy.{field} must be a floating-point torch.dtype, got {value!r}")

    def dtypes(self, master: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """(compute, reduce) for parameters stored in ``master``."""
        compute = self.param_dtype or master
        return compute, self.reduce_dtype or compute
