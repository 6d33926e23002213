"""Quality of cached generations against the uncached ones of the same seeds: PSNR, SSIM, and a Fréchet
distance in the feature space of a digits classifier trained here (FID's recipe, with features that fit
16x16 digits instead of an ImageNet Inception network that cannot be downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_RANGE = 2.0  # images live in [-1, 1]
PSNR_CAP_DB = 100.0  # identical images: reported as 100 dB rather than infinity


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"need two image batches (B, C, H, W) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """Mean over images of 10 log10(range^2 / MSE), each capped at 100 dB."""
    _check_pair(a, b)
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    db = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-300))
    return float(db.clamp(max=PSNR_CAP_DB).mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE, window: int = 7,
         sigma: float = 1.5) -> float:  # fmt: skip
    """Mean structural similarity (Wang et al. 2004: K1 0.01, K2 0.03, a Gaussian window of sigma 1.5; 7 wide
    by default for small images), over the valid window positions, channels and images."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(a.shape[-2:])} are smaller than the {window}-pixel SSIM window")
    c = a.shape[1]
    w = _gaussian_window(window, sigma).expand(c, 1, window, window)
    x, y = a.double(), b.double()
    mean = lambda v: F.conv2d(v, w, groups=c)  # noqa: E731
    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D), as FID computes it."""
    if features_a.dim() != 2 or features_a.shape[1] != features_b.shape[1] or min(len(features_a), len(features_b)) < 2:
        raise ValueError(f"need two feature sets (N >= 2, D) of one width, got {tuple(features_a.shape)} and "
                         f"{tuple(features_b.shape)}")  # fmt: skip
    a, b = features_a.double().numpy(), features_b.double().numpy()
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): symmetric, so stable for singular covariances
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ s_b @ root_a).clip(0)).sum()
    value = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    return float(max(value, 0.0))


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 digits; ``features`` is its 64-wide penultimate layer, the Fréchet feature space."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.classify = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def train_digit_classifier(
    images: torch.Tensor, labels: torch.Tensor, seed: int = 0, epochs: int = 30
) -> DigitClassifier:
    """Trained on the given (training) digits, full batch Adam; a few seconds on a CPU, deterministic for a seed."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(images.shape[0], generator=generator).split(128):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
