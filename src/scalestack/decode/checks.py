"""Input checks shared by the decoding entry points: bad input gets an error naming the problem and the fix."""

from __future__ import annotations

import numbers

import torch


def positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1 (Python or NumPy integers; not bools)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def integer_codes(ids: torch.Tensor, name: str) -> torch.Tensor:
    """An integer tensor of codes as int64 (any signed or unsigned integer dtype)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer codes, got dtype {ids.dtype}")
    return ids.long()


def token_map_for(token_map: object, length: int, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """``[length, vocab_size]`` model tokens per (level, code); identity when None; one row for every level."""
    if token_map is None:
        return torch.arange(vocab_size, device=device).expand(length, vocab_size)
    token_map = torch.as_tensor(token_map)
    shape = (length, vocab_size)
    if token_map.dim() == 1:
        token_map = token_map.expand(length, -1)
    if tuple(token_map.shape) != shape or token_map.dtype.is_floating_point or token_map.dtype == torch.bool:
        raise ValueError(
            f"token_map must be an integer tensor {list(shape)} (levels x codes) or [{vocab_size}], "
            f"got {list(token_map.shape)} {token_map.dtype}"
        )
    token_map = token_map.long()
    if int(token_map.min()) < 0:
        raise ValueError(f"token_map holds a negative token id ({int(token_map.min())}); map codes to model tokens")
    if (token_map.sort(1).values.diff(dim=1) == 0).any():
        raise ValueError("token_map maps two codes of one level to the same model token; give each code its own token")
    return token_map.to(device)
