"""Training data that ships inside a package: scikit-learn's 1,797 handwritten digits (8x8, 0..16),
upsampled to 16x16 and scaled to [-1, 1]. A fixed split keeps a held-out set for calibration and metrics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HELD_OUT = 297  # the last 297 digits (of 1,797): never trained on


def _digits_file() -> Path:
    """scikit-learn's digits file, found without importing scikit-learn: its import sets KMP_INIT_AT_FORK and
    KMP_DUPLICATE_LIB_OK in os.environ, which every process started afterwards would inherit."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits data set ships with scikit-learn: pip install 'scalestack[diffusion]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-learn's digits file is missing ({path}): reinstall scikit-learn")
    return path


def load_digits(split: str = "train", image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, image_size, image_size) in [-1, 1] and labels (N,) of one split: "train", "held_out", "all"."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    table = np.loadtxt(_digits_file(), delimiter=",")  # 1,797 rows: 64 pixels (0..16), then the label
    images = torch.tensor(table[:, :64], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images, labels = images * 2 - 1, torch.tensor(table[:, 64], dtype=torch.long)
    cut = len(labels) - HELD_OUT
    if split == "train":
        return images[:cut].contiguous(), labels[:cut].contiguous()
    if split == "held_out":
        return images[cut:].contiguous(), labels[cut:].contiguous()
    return images, labels
