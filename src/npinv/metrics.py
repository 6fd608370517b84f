"""Image quality metrics on arrays in [0, 1] (H, W, C): MSE, PSNR, SSIM."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def mse(a, b) -> float:
    return float(np.mean((_as_array(a) - _as_array(b)) ** 2))


def psnr(a, b, data_range: float = 1.0) -> float:
    err = mse(a, b)
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)


def ssim_map(a, b, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> tuple[np.ndarray, int]:
    """(C, H - k + 1, W - k + 1) SSIM map of two (H, W, C) arrays (Wang et al. 2004: Gaussian window
    11 / sigma 1.5, K1 0.01, K2 0.03, valid windows, scikit-image's sample covariance) and its side k."""
    x = torch.from_numpy(_as_array(a)).permute(2, 0, 1).unsqueeze(1)  # (C, 1, H, W)
    y = torch.from_numpy(_as_array(b)).permute(2, 0, 1).unsqueeze(1)
    window = min(window, x.shape[-1], x.shape[-2])
    window -= 1 - window % 2  # odd
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, kernel)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    n = window * window
    cov_norm = n / (n - 1)  # unbiased covariance, as scikit-image does
    vx = cov_norm * (blur(x * x) - mx * mx)
    vy = cov_norm * (blur(y * y) - my * my)
    vxy = cov_norm * (blur(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s[:, 0].numpy(), window


def ssim(a, b, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over the valid windows and channels (as scikit-image with ``gaussian_weights=True``)."""
    return float(ssim_map(a, b, data_range, window, sigma)[0].mean())


def tensor_to_unit(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return ((x[0].detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def image_metrics(reference, other) -> dict[str, float]:
    """PSNR, SSIM and MSE of two (H, W, 3) arrays in [0, 1]."""
    return {"psnr": psnr(reference, other), "ssim": ssim(reference, other), "mse": mse(reference, other)}
