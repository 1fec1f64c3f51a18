"""Local-contrast baseline: anomaly = |intensity - its local median|, lightly smoothed. Needs no training.

Three lines of image processing that any learned anomaly model must beat: everything that differs from its
neighbourhood (a nodule in lung, a hypodense lesion in liver) scores high, but so does every organ boundary.
The window is 3 x 9 x 9 voxels at the Screener spacing (6.75 x 13.5 x 13.5 mm), the smoothing a Gaussian of 1 voxel.
"""
import numpy as np
import torch
from scipy.ndimage import gaussian_filter, median_filter

LOCAL_CONTRAST_WINDOW = (3, 9, 9)  # (z, y, x) voxels
LOCAL_CONTRAST_SIGMA = 1.0  # voxels


def local_contrast_map(volume: np.ndarray) -> np.ndarray:
    """(z, y, x) float32 map of |volume - median over LOCAL_CONTRAST_WINDOW|, Gaussian-smoothed."""
    volume = np.asarray(volume, dtype=np.float32)
    contrast = np.abs(volume - median_filter(volume, size=LOCAL_CONTRAST_WINDOW, mode='nearest'))
    return gaussian_filter(contrast, LOCAL_CONTRAST_SIGMA, mode='nearest')


class LocalContrastPatchModel:
    """`PatchAnomalyModel` of the baseline on the stock nnU-Net input (HU rescaled to [0, 1]); runs on the CPU."""
    uses_clahe = False

    def __init__(self, patch_size):
        self.patch_size, self.device = tuple(patch_size), torch.device('cpu')

    def __call__(self, stock: torch.Tensor, clahe: torch.Tensor, crop_start: torch.Tensor) -> torch.Tensor:
        maps = [local_contrast_map(patch[0]) for patch in stock.float().cpu().numpy()]
        return torch.from_numpy(np.stack(maps))[:, None]
