"""CLAHE of whole preprocessed CT volumes (the paper's last preprocessing step).

Why it lives here and not in the plans: nnU-Net's stock preprocessing has no CLAHE, and stock `nnUNetv2_train` /
`nnUNetv2_predict` must keep working on `nnScreenerPlans`. So the fine-tuned UNet sees the stock nnU-Net input, while
the Screener models (descriptor, condition, density: the teacher) see CLAHE of the whole volume, computed once per
volume when the Screener cache is built (per-crop CLAHE would need ~11 CPU cores per GPU at the paper's throughput) and at
inference on the whole preprocessed volume.
"""
import numpy as np
from skimage.exposure import equalize_adapthist

# The clip limit is a plans setting (`screener.clahe_clip_limit`, see presets.py): the paper gives none, the authors'
# Screener configuration of vox2vec uses 0.05. Plans made before it was recorded used scikit-image's default 0.01.
LEGACY_CLAHE_CLIP_LIMIT = 0.01


def apply_clahe(volume01: np.ndarray, clip_limit: float) -> np.ndarray:
    """CLAHE of a (z, y, x) volume with values in [0, 1]; kernel = 1/8 of each axis (scikit-image's default)."""
    return equalize_adapthist(np.clip(volume01, 0, 1).astype(np.float64), clip_limit=clip_limit).astype(np.float32)
