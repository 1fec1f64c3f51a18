"""PNG overlays of anomaly maps on CT slices, for a person to look at (not for evaluation)."""
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display needed

from nnscreener.planners.presets import BODY_THRESHOLD_HU
from nnscreener.utilities.io import atomic_path

SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU: level 40, width 400
SLICE_SCORE_PERCENTILE = 99
HEAT_PERCENTILE = 95  # the map is drawn only where it exceeds this percentile of the body's map values
PANEL_INCHES = 4.0


def save_overlay_png(ct_hu: np.ndarray, anomaly_map: np.ndarray, spacing: Sequence[float], out_png: str,
                     n_slices: int = 3, mask: Optional[np.ndarray] = None,
                     body_threshold_hu: float = BODY_THRESHOLD_HU) -> None:
    """PNG of the `n_slices` axial slices with the highest map (99th percentile per slice), in z order.

    ct_hu, anomaly_map, mask: (z, y, x) on one grid; spacing: (z, y, x) mm (sets the aspect ratio). The CT is shown
    in a soft-tissue window, the map as a semi-transparent heat overlay above its 95th percentile inside the body
    (> body_threshold_hu), the reference mask (if given) as a cyan contour.
    """
    if ct_hu.shape != anomaly_map.shape or (mask is not None and mask.shape != ct_hu.shape):
        raise ValueError(f'CT {ct_hu.shape}, map {anomaly_map.shape} and mask '
                         f'{None if mask is None else mask.shape} must share one (z, y, x) grid')
    slice_scores = np.percentile(anomaly_map.reshape(len(anomaly_map), -1), SLICE_SCORE_PERCENTILE, axis=1)
    slices = np.sort(np.argsort(-slice_scores, kind='stable')[:n_slices])
    body = ct_hu > body_threshold_hu
    threshold = np.percentile(anomaly_map[body] if body.any() else anomaly_map, HEAT_PERCENTILE)
    heat_range = dict(vmin=threshold, vmax=max(float(anomaly_map.max()), threshold + 1e-6))
    aspect = spacing[1] / spacing[2]  # rows are y, columns x

    height = PANEL_INCHES * ct_hu.shape[1] * aspect / ct_hu.shape[2]
    fig = Figure(figsize=(PANEL_INCHES * len(slices) + 1, height + 0.6), layout='constrained')
    axes = np.atleast_1d(fig.subplots(1, len(slices)))
    for ax, z in zip(axes, slices):
        ax.imshow(ct_hu[z], cmap='gray', vmin=SOFT_TISSUE_WINDOW[0], vmax=SOFT_TISSUE_WINDOW[1], aspect=aspect,
                  interpolation='nearest')
        heat = ax.imshow(np.ma.masked_less(anomaly_map[z], threshold), cmap='autumn', alpha=0.5, aspect=aspect,
                         interpolation='nearest', **heat_range)
        if mask is not None and mask[z].any():
            ax.contour(mask[z] > 0, levels=[0.5], colors='cyan', linewidths=1.0)
        ax.set_title(f'slice z={z}, map p{SLICE_SCORE_PERCENTILE} {slice_scores[z]:.3g}', fontsize=9)
        ax.set_axis_off()
    fig.colorbar(heat, ax=list(axes), shrink=0.8, label='anomaly score')
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
