"""PNG overlays of anomaly maps on CT slices, for a person to look at (not for evaluation).

One panel per axial slice worth seeing: the slice through the highest-scoring region of the map, one through the
centre of every lesion of the reference mask (if given), then further high-scoring regions, at most MAX_PANELS.
Each panel shows the CT in a soft-tissue window, or a lung window where most of the slice's body is lung, the map as
a heat overlay where it exceeds the body's 95th percentile (colour scale capped at the body's 99.9th, so one extreme
voxel does not wash the rest out) and the reference mask as a cyan contour; its title says what it is.
"""
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display needed
from scipy import ndimage

from nnscreener.preprocessing.body import body_mask_hu
from nnscreener.utilities.io import atomic_path

SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU: level 40, width 400
LUNG_WINDOW = (-1350.0, 150.0)  # HU: level -600, width 1500
LUNG_HU = -500.0  # body voxels below this are lung (or other air inside the patient)
LUNG_SLICE_SHARE = 0.3  # a slice is shown in the lung window when more of its body than this is lung
HEAT_PERCENTILES = (95.0, 99.9)  # colour scale of the map: from / to these percentiles of its values in the body
SMOOTHING_SIGMA = 1.0  # voxels: the top region is the maximum of the smoothed map, not a single noisy voxel
TOP_REGION_PERCENTILE = 99.0  # regions: connected parts of the body where the smoothed map is above this percentile
TOP_REGION_GAP_MM = 20.0  # a further top region must lie at least this far (along z) from the earlier ones
MAX_PANELS = 6
N_COLUMNS = 3
PANEL_INCHES = 4.0
LESION_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connected lesions, as in the evaluation's AUPRO


def heat_range(anomaly_map: np.ndarray, body: Optional[np.ndarray] = None) -> Tuple[float, float]:
    """(vmin, vmax) of the heat overlay: the 95th and 99.9th percentiles of the map inside the body (the whole map
    if the body is None or empty). The map is drawn only above vmin; vmax is a percentile, not the maximum, so a
    single extreme voxel does not flatten the colour scale. vmax > vmin always."""
    values = anomaly_map[body] if body is not None and body.any() else np.ravel(anomaly_map)
    vmin, vmax = (float(v) for v in np.percentile(values, HEAT_PERCENTILES))
    if vmax <= vmin:  # the top 5 % of the body share one value (e.g. a binary map): the maximum is all there is
        vmax = float(values.max())
    return vmin, max(vmax, vmin + 1e-6 * max(1.0, abs(vmin)))


def slice_window(ct_slice: np.ndarray, body_slice: Optional[np.ndarray] = None) -> Tuple[str, Tuple[float, float]]:
    """('lung', LUNG_WINDOW) when more than LUNG_SLICE_SHARE of the slice's body voxels are below LUNG_HU, else
    ('soft tissue', SOFT_TISSUE_WINDOW)."""
    values = ct_slice[body_slice] if body_slice is not None else np.ravel(ct_slice)
    if values.size and (values < LUNG_HU).mean() > LUNG_SLICE_SHARE:
        return 'lung', LUNG_WINDOW
    return 'soft tissue', SOFT_TISSUE_WINDOW


def overlay_slices(anomaly_map: np.ndarray, body: Optional[np.ndarray] = None, mask: Optional[np.ndarray] = None,
                   n_top: int = 1, max_panels: int = MAX_PANELS,
                   spacing: Optional[Sequence[float]] = None) -> List[Tuple[str, int]]:
    """The axial slices of an overlay as [(label, z)], in panel order. See _select_slices."""
    return _select_slices(anomaly_map, body, mask, n_top, max_panels, spacing)[0]


def _select_slices(anomaly_map, body, mask, n_top, max_panels, spacing) -> Tuple[List[Tuple[str, int]], int]:
    """-> ([(label, z)], number of lesions left out).

    1. 'top region': the slice holding the voxel of maximum map inside the body, after smoothing the map with a
       SMOOTHING_SIGMA-voxel Gaussian (the whole map if the body is None or empty);
    2. 'lesion k' (k = 1 the largest): per 26-connected component of the mask, its centre-of-mass slice (or the
       nearest slice the lesion is in), largest lesions first while panels are left; a lesion on the slice of an
       earlier panel is named in that panel's label instead (e.g. 'top region + lesion 1');
    3. 'top region 2', ... (up to n_top top regions in all): other high-scoring regions, i.e. 26-connected parts of
       the body where the smoothed map exceeds its TOP_REGION_PERCENTILE, by their maximum, each on the slice of
       that maximum; skipped when within TOP_REGION_GAP_MM (spacing[0] mm per slice; 1 mm if not given) of an
       earlier top region's slice. A map with one high region (e.g. a long vessel) gets one top region only.
    """
    inside = body if body is not None and body.any() else np.ones(anomaly_map.shape, bool)
    smoothed = ndimage.gaussian_filter(anomaly_map.astype(np.float32), SMOOTHING_SIGMA)
    tops = [int(np.unravel_index(np.argmax(np.where(inside, smoothed, -np.inf)), smoothed.shape)[0])]
    if n_top > 1:
        level = np.percentile(smoothed[inside], TOP_REGION_PERCENTILE)
        regions, n_regions = ndimage.label(inside & (smoothed >= level), structure=LESION_CONNECTIVITY)
        index = np.arange(1, n_regions + 1)
        peaks = ndimage.maximum_position(smoothed, regions, index)
        gap = max(1, int(math.ceil(TOP_REGION_GAP_MM / (spacing[0] if spacing is not None else 1.0))))
        for k in np.argsort(-np.asarray(ndimage.maximum(smoothed, regions, index)), kind='stable'):
            if len(tops) == n_top:
                break
            if all(abs(peaks[k][0] - z) >= gap for z in tops):
                tops.append(int(peaks[k][0]))
    del smoothed
    panels = [['top region', tops[0]]]

    lesion_slices = []
    if mask is not None and np.any(mask):
        labels, n = ndimage.label(mask > 0, structure=LESION_CONNECTIVITY)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        centres = ndimage.center_of_mass(labels > 0, labels, np.arange(1, n + 1))
        boxes = ndimage.find_objects(labels)
        for index in np.argsort(-sizes, kind='stable'):
            box = boxes[index]
            present = box[0].start + np.flatnonzero((labels[box] == index + 1).any(axis=(1, 2)))
            lesion_slices.append(int(present[np.argmin(np.abs(present - centres[index][0]))]))
    n_hidden = 0
    for k, z in enumerate(lesion_slices, start=1):
        same = next((p for p in panels if p[1] == z), None)
        if same is not None:
            same[0] += f' + lesion {k}'
        elif len(panels) < max_panels:
            panels.append([f'lesion {k}', z])
        else:
            n_hidden += 1
    for k, z in enumerate(tops[1:], start=2):
        same = next((p for p in panels if p[1] == z), None)
        if same is not None:
            same[0] = f'top region {k} + {same[0]}'
        elif len(panels) < max_panels:
            panels.append([f'top region {k}', z])
        else:
            break
        panels[0][0] = panels[0][0].replace('top region', 'top region 1', 1) if k == 2 else panels[0][0]
    return [(label, int(z)) for label, z in panels], n_hidden


def draw_panel(ax, ct_slice: np.ndarray, map_slice: np.ndarray, window: Tuple[float, float],
               heat: Tuple[float, float], aspect: float, contour: Optional[np.ndarray] = None,
               contour_colour: str = 'cyan'):
    """One panel: the CT slice in `window` (HU), the map as a heat overlay above heat[0] with its colour scale capped
    at heat[1] (heat_range), the contour of `contour` (a mask slice) if it has any voxel. aspect: row / column
    spacing. Returns the heat image, for a colour bar."""
    ax.imshow(ct_slice, cmap='gray', vmin=window[0], vmax=window[1], aspect=aspect, interpolation='nearest')
    image = ax.imshow(np.ma.masked_where(map_slice <= heat[0], map_slice), cmap='autumn', alpha=0.55, aspect=aspect,
                      interpolation='nearest', vmin=heat[0], vmax=heat[1])
    if contour is not None and contour.any():
        ax.contour(contour > 0, levels=[0.5], colors=contour_colour, linewidths=1.0)
    ax.set_axis_off()
    return image


def save_overlay_png(ct_hu: np.ndarray, anomaly_map: np.ndarray, spacing: Sequence[float], out_png: str,
                     n_slices: int = 3, mask: Optional[np.ndarray] = None, title: Optional[str] = None,
                     body: Optional[np.ndarray] = None, max_panels: int = MAX_PANELS) -> None:
    """PNG of the slices worth seeing (overlay_slices: the top region, every lesion's centre, up to n_slices top
    regions in all, at most max_panels panels), written atomically.

    ct_hu, anomaly_map, mask, body: (z, y, x) on one grid; spacing: (z, y, x) mm (aspect ratio, body mask). body
    defaults to body_mask_hu(ct_hu, spacing). Per panel the CT in a soft-tissue or lung window (slice_window), the
    map where it exceeds vmin of heat_range, the reference mask (if given) as a cyan contour. title: the figure's
    title (e.g. 'case - model').
    """
    if ct_hu.shape != anomaly_map.shape or any(a is not None and a.shape != ct_hu.shape for a in (mask, body)):
        raise ValueError(f'CT {ct_hu.shape}, map {anomaly_map.shape}, mask {None if mask is None else mask.shape} '
                         f'and body {None if body is None else body.shape} must share one (z, y, x) grid')
    body = body_mask_hu(ct_hu, spacing) if body is None else body.astype(bool)
    panels, n_hidden = _select_slices(anomaly_map, body, mask, n_slices, max_panels, spacing)
    vmin, vmax = heat_range(anomaly_map, body)
    aspect = spacing[1] / spacing[2]  # rows are y, columns x

    n_rows = int(math.ceil(len(panels) / N_COLUMNS))
    n_columns = int(math.ceil(len(panels) / n_rows))  # 4 panels: 2 x 2
    height = PANEL_INCHES * ct_hu.shape[1] * aspect / ct_hu.shape[2]
    fig = Figure(figsize=(PANEL_INCHES * n_columns + 1.2, (height + 0.5) * n_rows + 0.9), layout='constrained')
    axes = np.atleast_1d(fig.subplots(n_rows, n_columns, squeeze=False)).ravel()
    for ax, (label, z) in zip(axes, panels):
        window_name, window = slice_window(ct_hu[z], body[z])
        heat = draw_panel(ax, ct_hu[z], anomaly_map[z], window, (vmin, vmax), aspect,
                          None if mask is None else mask[z])
        ax.set_title(f'{label}  z={z}\n{window_name} window', fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(heat, ax=list(axes), shrink=0.8, label='anomaly score (body p95 to p99.9)')
    if title:
        fig.suptitle(title, fontsize=12)
    notes = ['heat: map above its 95th percentile in the body'] + (['cyan: reference mask'] if mask is not None
                                                                    else [])
    if n_hidden:
        notes.append(f'{n_hidden} smaller lesion(s) not shown')
    fig.supxlabel(';  '.join(notes + ['z: axial slice index']), fontsize=8)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
