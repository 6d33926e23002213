"""Newton–Schulz orthogonalization of a batch of same-shape matrices (Muon's core), in one dtype.

The quintic iteration of ``torch.optim.Muon`` (Keller Jordan's coefficients by default): normalize each
matrix by its Frobenius norm, then ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, on the wide
orientation (a tall matrix is transposed first, so ``A`` is the smaller Gram matrix). Batched with
``baddbmm``: one kernel per iteration step for every matrix of a shape.
"""

from __future__ import annotations

import torch

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def check_ns_args(coefficients: object, steps: object, eps: object) -> None:
    if not (isinstance(coefficients, (tuple, list)) and len(coefficients) == 3):
        raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {coefficients!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps < 100:
        raise ValueError(f"ns_steps must be an int in [1, 99], got {steps!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def orthogonalize(G: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """``[k, m, n]`` matrices -> their approximate orthogonalizations ``U S' V^T``, ``[k, m, n]`` in ``dtype``."""
    if G.dim() != 3:
        raise ValueError(f"orthogonalize takes a [k, m, n] batch of matrices, got shape {list(G.shape)}")
    a, b, c = coefficients
    X = G.to(dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X
