"""The patient's body: the one mask that the Screener cache, CLAHE, SSL pairs, density training, maps, scan scores and
the evaluation all use (the paper's "dense foreground"; documentation/method.md).

The paper crops to the "dense foreground"; the authors' code (vox2vec `get_body_mask`) flood-fills the air from the
outside, so lungs, airways and bowel gas are *inside* the body. A plain "> -500 HU" mask has the lungs outside (no SSL
pairs there, lung voxels never count as normal tissue) and a bounding box of it holds the table and the air around
the patient. Here the body is:

1. voxels above -500 HU, opened in-plane by a few millimetres, so the thin shell of the patient table and the contact
   line where the back rests on it come apart from the patient;
2. the largest 3D connected component of that, grown back by the same radius within the dense voxels (the skin is
   kept exactly);
3. air inside the patient added, slice by slice (axial), where in-plane air regions are the connected parts of the
   slice below -500 HU. A region inside the patient touches the body (the foam core of the table touches only the
   table's shell) and either does not reach the image edge (bowel gas, airways, lungs of a slice that encloses them)
   or is not air-dark (median above -900 HU: lung parenchyma, not the -1000 HU of the room) in a slice whose field
   of view cuts through the patient: the lungs of a cropped chest. Dense islands that the added air encloses (lung
   vessels) are inside too.
"""
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnscreener.planners.presets import BODY_THRESHOLD_HU, CT_CLIP_RANGE

TABLE_SEPARATION_MM = 3.0  # opening radius: the table's carbon shell is ~2 mm thick, patients are much thicker
ROOM_AIR_MAX_HU = -900.0  # room air: -1000 HU, up to ~-940 blurred into a 3 mm grid; lung parenchyma: ~-850 HU


def hu_to_01(hu: float) -> float:
    """HU -> the [0, 1] units of the preprocessed volumes (CT_CLIP_RANGE rescaled)."""
    return (hu - CT_CLIP_RANGE[0]) / (CT_CLIP_RANGE[1] - CT_CLIP_RANGE[0])


def body_mask(volume01: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Boolean (z, y, x) body mask of a preprocessed CT volume ([0, 1] units); spacing (z, y, x) mm."""
    return _body_mask(volume01, spacing, hu_to_01(BODY_THRESHOLD_HU), hu_to_01(ROOM_AIR_MAX_HU))


def body_mask_hu(ct_hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Boolean (z, y, x) body mask of a CT in Hounsfield units (raw scans: evaluation, scan scores, overlays)."""
    return _body_mask(ct_hu, spacing, BODY_THRESHOLD_HU, ROOM_AIR_MAX_HU)


def body_mask_of_image(image: sitk.Image) -> np.ndarray:
    """`body_mask_hu` of a SimpleITK CT: its voxels in HU, its spacing turned to (z, y, x)."""
    return body_mask_hu(sitk.GetArrayViewFromImage(image), image.GetSpacing()[::-1])


def _body_mask(volume: np.ndarray, spacing: Sequence[float], dense_min: float, room_air_max: float) -> np.ndarray:
    volume = np.asarray(volume)
    dense = volume > dense_min
    if not dense.any():
        return dense
    radius = max(1, int(round(TABLE_SEPARATION_MM / max(min(spacing[1:]), 1e-3))))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_erosion(dense, in_plane, iterations=radius)
    if not core.any():  # a body thinner than the opening (a tiny crop): keep the dense voxels' largest part
        core = dense
    body = _largest_component(core)
    if core is not dense:
        body = ndimage.binary_dilation(body, in_plane, iterations=radius, mask=dense)
    for z in range(len(body)):
        body[z] = _with_air_inside(body[z], dense[z], volume[z], room_air_max)
    return body


def _with_air_inside(body2d: np.ndarray, dense2d: np.ndarray, slice2d: np.ndarray, room_air_max: float) -> np.ndarray:
    """One axial slice of the body with the air inside the patient added (see the module doc, step 3)."""
    if not body2d.any():
        return body2d
    labels, n = ndimage.label(~dense2d)
    if n == 0:
        return body2d
    index = np.arange(1, n + 1)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    reaches_edge = np.isin(index, edge_labels)
    median = np.asarray(ndimage.median(slice2d, labels, index))
    touches_body = np.isin(index, labels[ndimage.binary_dilation(body2d) & ~dense2d])
    fov_cuts_body = body2d[0].any() or body2d[-1].any() or body2d[:, 0].any() or body2d[:, -1].any()
    inside = touches_body & (~reaches_edge | (fov_cuts_body & (median > room_air_max)))
    # dense islands the added air encloses (lung vessels thinner than the opening) belong to the patient as well
    return ndimage.binary_fill_holes(body2d | (inside[labels - 1] & (labels > 0)))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def mask_bbox(mask: np.ndarray, min_size: Sequence[int]) -> list:
    """[(lo, hi)] per axis: the bounding box of `mask`, grown symmetrically to at least `min_size` where the volume
    allows (the whole volume if the mask is empty)."""
    shape = mask.shape
    if mask.any():
        nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
                   for axis in range(mask.ndim)]
        lo, hi = np.array([n[0] for n in nonzero]), np.array([n[-1] + 1 for n in nonzero])
    else:
        lo, hi = np.zeros(mask.ndim, int), np.array(shape)
    bbox = []
    for axis, (l, h) in enumerate(zip(lo, hi)):
        grow = max(0, min_size[axis] - (h - l))
        l, h = l - grow // 2, h + grow - grow // 2
        shift = max(0, -l) - max(0, h - shape[axis])
        bbox.append((int(max(0, l + shift)), int(min(shape[axis], h + shift))))
    return bbox
