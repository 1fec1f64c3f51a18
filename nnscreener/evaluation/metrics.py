"""Voxel-level metrics for unsupervised anomaly maps (Screener paper, Sec. 4.1; MVTec AD conventions).

All functions take numpy arrays (score maps: float, higher = more anomalous; masks: bool, True = pathology) and
return Python floats. Conventions:

- A voxel is predicted positive at threshold t when its score is >= t.
- AUROC / AUPRO "up to FPR 0.3" are the areas under the ROC / PRO curve for FPR in [0, max_fpr], divided by
  max_fpr (MVTec AD, Bergmann et al. 2021): 1.0 is perfect, a random (diagonal) ROC gives max_fpr / 2 = 0.15.
  This is NOT scikit-learn's `roc_auc_score(max_fpr=...)`, which applies the McClish correction (random = 0.5).
- Lesions (PRO regions) are 3D connected components of the mask with full (26-)connectivity, the 3D analogue of
  the 8-connectivity MVTec AD uses in 2D.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score, roc_curve

# 26-connectivity in 3D (nnU-Net axis order does not matter for a symmetric structuring element)
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def sample_voxels(score_map: np.ndarray, mask: np.ndarray, n: Optional[int] = 1000,
                  rng: Optional[np.random.Generator] = None,
                  outside: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Draws n voxels inside the pathology mask and n outside it (paper: 1000 + 1000 per test image).

    The outside voxels are "mostly normal" (masks cover only the target pathology); `outside` optionally restricts
    them further (e.g. to the body). Sampling is without replacement, or with replacement when a side has fewer than
    n voxels, so every image contributes exactly n + n voxels to a pooled estimate. n=None takes all voxels.
    Returns (labels, scores) with labels 1 = pathology.
    """
    mask = mask.astype(bool)
    normal = ~mask if outside is None else (~mask & outside.astype(bool))
    if not mask.any() or not normal.any():
        raise ValueError('sample_voxels needs voxels both inside and outside the pathology mask')
    rng = np.random.default_rng() if rng is None else rng
    parts = []
    for region in (mask, normal):
        scores = score_map[region]
        if n is not None:
            scores = scores[rng.choice(scores.size, n, replace=scores.size < n)]
        parts.append(scores)
    labels = np.concatenate([np.ones(parts[0].size, dtype=np.int8), np.zeros(parts[1].size, dtype=np.int8)])
    return labels, np.concatenate(parts)


def sampled_voxel_auroc(score_map: np.ndarray, mask: np.ndarray, n: Optional[int] = 1000,
                        rng: Optional[np.random.Generator] = None, outside: Optional[np.ndarray] = None) -> float:
    """Voxel-level AUROC of one image, estimated from n voxels inside and n outside the mask (see sample_voxels)."""
    return float(roc_auc_score(*sample_voxels(score_map, mask, n, rng, outside)))


def pooled_sampled_auroc(samples: Sequence[Tuple[np.ndarray, np.ndarray]]) -> float:
    """Dataset-level voxel AUROC (the paper's number): one ROC over the sampled voxels of all images pooled."""
    labels, scores = (np.concatenate(parts) for parts in zip(*samples))
    return float(roc_auc_score(labels, scores))


def _normalised_area_up_to(x: np.ndarray, y: np.ndarray, max_x: float) -> float:
    """Area under the piecewise-linear curve y(x) on [0, max_x] divided by max_x; x non-decreasing from 0.

    The curve is linearly interpolated at exactly max_x (same construction as scikit-learn's partial AUC).
    """
    if not 0 < max_x <= 1:
        raise ValueError(f'max_fpr must be in (0, 1], got {max_x}')
    stop = np.searchsorted(x, max_x, side='right')
    x_part, y_part = x[:stop], y[:stop]
    if stop < len(x):
        y_at = np.interp(max_x, x[stop - 1:stop + 1], y[stop - 1:stop + 1])
        x_part, y_part = np.append(x_part, max_x), np.append(y_part, y_at)
    return float(auc(x_part, y_part) / max_x)


def auroc_up_to_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the ROC curve for FPR in [0, max_fpr] (MVTec AD; perfect 1.0, random max_fpr / 2)."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return _normalised_area_up_to(fpr, tpr, max_fpr)


def _counts_at_or_above(scores: np.ndarray, thresholds: np.ndarray, groups: Optional[np.ndarray] = None,
                        n_groups: int = 1) -> np.ndarray:
    """counts[g, j] = number of scores of group g that are >= thresholds[j] (thresholds sorted ascending).

    One searchsorted + bincount instead of a loop over thresholds: O(N log T).
    """
    n_bins = len(thresholds) + 1
    # bin = number of thresholds <= score, so score >= thresholds[j] <=> bin > j
    bins = np.searchsorted(thresholds, scores.ravel(), side='right')
    flat = bins if groups is None else groups.ravel() * n_bins + bins
    hist = np.bincount(flat, minlength=n_groups * n_bins).reshape(n_groups, n_bins)
    at_or_above_bin = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    return at_or_above_bin[:, 1:]


def pro_thresholds(normal_scores: np.ndarray, lesion_scores: np.ndarray, max_fpr: float = 0.3,
                   n_thresholds: int = 1000) -> np.ndarray:
    """Threshold grid for the PRO curve, sorted ascending.

    Half of the thresholds are quantiles of the normal-voxel scores at FPR levels 0 .. 1.1 * max_fpr (uniform
    resolution on the FPR axis where the curve is integrated), half are quantiles of the lesion-voxel scores
    (resolution on the overlap axis; makes a perfect map reach PRO 1 at FPR 0). Between grid points the curve is
    linear, as in the trapezoid integration of MVTec AD.
    """
    half = max(n_thresholds // 2, 2)
    fpr_levels = np.linspace(0.0, min(1.0, 1.1 * max_fpr), half)
    return np.unique(np.concatenate([np.quantile(normal_scores, 1.0 - fpr_levels),
                                     np.quantile(lesion_scores, np.linspace(0.0, 1.0, half))]))


def pro_counts(score_map: np.ndarray, mask: np.ndarray, thresholds: np.ndarray,
               region: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, int]:
    """Per-image ingredients of the PRO curve at the given (ascending) thresholds.

    Returns (overlap, false_positives, n_normal): overlap[r, j] = fraction of lesion r (3D connected component,
    26-connectivity) with score >= thresholds[j]; false_positives[j] = number of normal voxels with score >=
    thresholds[j]; n_normal = number of normal voxels. Normal voxels are the out-of-mask voxels, or, with `region`
    (bool, e.g. the body), the out-of-mask voxels inside it; lesions always are the whole mask. Kept separate so a
    dataset can be accumulated one volume at a time (see aupro_from_counts).
    """
    mask = mask.astype(bool)
    regions, n_regions = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    inside = _counts_at_or_above(score_map[mask], thresholds, regions[mask] - 1, max(n_regions, 1))[:n_regions]
    sizes = np.bincount(regions[mask] - 1, minlength=n_regions)
    normal = ~mask if region is None else (~mask & region.astype(bool))
    false_positives = _counts_at_or_above(score_map[normal], thresholds)[0]
    return inside / sizes[:, None], false_positives, int(normal.sum())


def aupro_from_counts(overlaps: Sequence[np.ndarray], false_positives: Sequence[np.ndarray],
                      n_normal: Sequence[int], max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to max_fpr from pro_counts of one or more images.

    PRO(t) = mean overlap over all lesions of all images (every lesion counts equally, whatever its size);
    FPR(t) = normal voxels >= t over all normal voxels of all images (see pro_counts' `region`).
    """
    pro = np.concatenate(overlaps, axis=0).mean(axis=0)
    fpr = np.sum(false_positives, axis=0) / np.sum(n_normal)
    # ascending thresholds -> both curves non-increasing; reverse, and anchor at t=+inf (0, 0) and t=-inf (1, 1)
    fpr = np.concatenate([[0.0], fpr[::-1], [1.0]])
    pro = np.concatenate([[0.0], pro[::-1], [1.0]])
    return _normalised_area_up_to(fpr, pro, max_fpr)


def aupro_up_to_fpr(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_fpr: float = 0.3,
                    n_thresholds: int = 1000, thresholds: Optional[np.ndarray] = None) -> float:
    """Normalised area under the per-region-overlap curve for FPR in [0, max_fpr] (MVTec AD AUPRO), over all images.

    Thresholds default to pro_thresholds of all voxels of the given maps (n_thresholds quantiles).
    """
    masks = [m.astype(bool) for m in masks]
    if thresholds is None:
        thresholds = pro_thresholds(np.concatenate([s[~m] for s, m in zip(score_maps, masks)]),
                                    np.concatenate([s[m] for s, m in zip(score_maps, masks)]), max_fpr, n_thresholds)
    counts = [pro_counts(s, m, thresholds) for s, m in zip(score_maps, masks)]
    return aupro_from_counts(*zip(*counts), max_fpr=max_fpr)


def pooled_average_precision(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Voxel-level average precision over all voxels of all images pooled (MOOD challenge style)."""
    return float(average_precision_score(np.concatenate([m.ravel() for m in masks]).astype(bool),
                                         np.concatenate([s.ravel() for s in score_maps])))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nnU-Net's convention)."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    denominator = pred.sum() + ref.sum()
    return float(2 * (pred & ref).sum() / denominator) if denominator else float('nan')


def dice_at_thresholds(score_map: np.ndarray, mask: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Dice of (score_map >= t) against the mask for every t of the ascending thresholds."""
    mask = mask.astype(bool)
    true_positives = _counts_at_or_above(score_map[mask], thresholds)[0]
    predicted = _counts_at_or_above(score_map, thresholds)[0]
    denominator = predicted + mask.sum()
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(denominator > 0, 2 * true_positives / denominator, np.nan)


def dice_candidates(lesion_scores: np.ndarray, n_candidates: int = 1000) -> np.ndarray:
    """Candidate thresholds for best_dice_threshold: quantiles of the scores inside the masks.

    Raising t to the next in-mask score only removes false positives, so the Dice-optimal t is always one of the
    in-mask scores; the search is exact when n_candidates >= the number of distinct in-mask scores.
    """
    return np.unique(np.quantile(lesion_scores, np.linspace(0.0, 1.0, n_candidates)))


def best_dice_threshold(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_candidates: int = 1000,
                        candidates: Optional[np.ndarray] = None) -> Tuple[float, float]:
    """Threshold maximising the mean per-case Dice over the given pathological cases -> (threshold, mean Dice).

    Mean per-case Dice is what the paper reports (mean +- std over test cases); it picks the threshold on 10
    pathological cases and keeps it fixed for the rest. Ties go to the lowest threshold.
    """
    masks = [m.astype(bool) for m in masks]
    if not all(m.any() for m in masks):
        raise ValueError('best_dice_threshold needs pathological cases (non-empty masks) only')
    if candidates is None:
        candidates = dice_candidates(np.concatenate([s[m] for s, m in zip(score_maps, masks)]), n_candidates)
    return best_threshold_from_curves(candidates, [dice_at_thresholds(s, m, candidates)
                                                   for s, m in zip(score_maps, masks)])


def best_threshold_from_curves(candidates: np.ndarray, dice_curves: List[np.ndarray]) -> Tuple[float, float]:
    """best_dice_threshold from precomputed dice_at_thresholds curves (for one-volume-at-a-time evaluation)."""
    mean_dice = np.mean(dice_curves, axis=0)
    best = int(np.argmax(mean_dice))
    return float(candidates[best]), float(mean_dice[best])
