"""A synthetic lesion planted into a real CT file: a sphere of fixed HU in the middle of its soft tissue. The same scan
with and without it shows whether a map answers a lesion where it is (tests, benchmarks/quality/planted_lesion.py)."""
from typing import Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion

from nnscreener.utilities.io import atomic_path, read_image

SOFT_TISSUE_HU = (0, 120)


def plant_sphere(image_file: str, out_file: str, radius_mm: float = 6.0, hu: float = -500.0
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Writes the CT with a `hu` sphere centred in its soft tissue (the middle voxel, in raster order, of the soft
    tissue eroded by 3 voxels, so the sphere's centre is well inside an organ); returns the sphere and the > -500 HU
    masks, (z, y, x) like SimpleITK's arrays."""
    image = read_image(image_file)
    ct = sitk.GetArrayFromImage(image)
    soft_tissue = np.argwhere(binary_erosion((ct > SOFT_TISSUE_HU[0]) & (ct < SOFT_TISSUE_HU[1]), iterations=3))
    centre = soft_tissue[len(soft_tissue) // 2]
    grid = np.indices(ct.shape).transpose(1, 2, 3, 0)
    sphere = (((grid - centre) * image.GetSpacing()[::-1]) ** 2).sum(-1) < radius_mm ** 2
    planted = sitk.GetImageFromArray(np.where(sphere, hu, ct).astype(ct.dtype))
    planted.CopyInformation(image)
    with atomic_path(out_file) as tmp:
        sitk.WriteImage(planted, tmp, useCompression=True)
    return sphere, ct > -500
