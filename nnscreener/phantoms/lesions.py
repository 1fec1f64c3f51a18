"""Pathologies of the phantom: lung nodules, ground-glass opacities, liver and kidney tumours, each with an exact
mask that lies inside its organ."""
import numpy as np
from scipy.ndimage import gaussian_filter

from nnscreener.phantoms.anatomy import LUNG_REGION, Tissue
from nnscreener.phantoms.shapes import Grid, Superellipsoid, rotation

# codes of the lesion-type maps (lesion_typesTr); 0 is background
LESION_TYPES = {1: 'solid_nodule', 2: 'ground_glass', 3: 'liver_tumour_hypo', 4: 'liver_tumour_hyper',
                5: 'kidney_tumour_hypo', 6: 'kidney_tumour_hyper'}
LESION_ORGANS = {1: LUNG_REGION, 2: LUNG_REGION, 3: (Tissue.LIVER,), 4: (Tissue.LIVER,), 5: (Tissue.KIDNEY,),
                 6: (Tissue.KIDNEY,)}
ORGAN_TISSUE = {3: Tissue.LIVER, 4: Tissue.LIVER, 5: Tissue.KIDNEY, 6: Tissue.KIDNEY}
# surface irregularity (fraction of the radius) and the share of a candidate that must fall inside the organ
LOBULATION = {1: 0.15, 2: 0.35, 3: 0.1, 4: 0.1, 5: 0.08, 6: 0.08}
MIN_INSIDE = {1: 0.9, 2: 0.7, 3: 0.9, 4: 0.9, 5: 0.85, 6: 0.85}
ATTEMPTS = 30


def _smooth_noise(rng, shape, sigma_vox):
    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode='reflect')
    return field / max(float(field.std()), 1e-6)


class LesionPainter:
    """Places lesions into one case: edits `hu` and `lesion_type` in place, reads the tissue map."""

    def __init__(self, rng, hu, tissue, lesion_type, grid: Grid, mm_per_model, tissue_hu, diameters: dict):
        self.rng, self.hu, self.tissue, self.lesion_type, self.grid = rng, hu, tissue, lesion_type, grid
        self.mm_per_model = np.asarray(mm_per_model, float)  # world mm per model mm along (z, y, x)
        self.tissue_hu = tissue_hu
        self.diameters = diameters  # lesion code -> (min, max) diameter in world mm
        self._organ_voxels = {}

    def organ_voxels(self, code: int) -> np.ndarray:
        organ = LESION_ORGANS[code]
        if organ not in self._organ_voxels:
            self._organ_voxels[organ] = np.flatnonzero(np.isin(self.tissue, organ))
        return self._organ_voxels[organ]

    def available_types(self) -> list[int]:
        """Lesion types whose organ holds at least ~30 smallest lesions' worth of voxels in this field of view."""
        voxel_mm3 = np.prod(np.abs(self.grid.step) * self.mm_per_model)
        return [c for c in LESION_TYPES
                if self.organ_voxels(c).size * voxel_mm3 >= 30 * np.pi / 6 * self.diameters[c][0] ** 3]

    def add(self, code: int) -> int:
        """Place one lesion of type `code`; returns its voxel count (0 if no place was found)."""
        rng, grid = self.rng, self.grid
        lo, hi = self.diameters[code]
        radius_mm = np.exp(rng.uniform(np.log(lo), np.log(hi))) / 2  # log-uniform: small lesions are commoner
        candidates = self.organ_voxels(code)
        for attempt in range(ATTEMPTS):
            if attempt and attempt % 6 == 0:
                radius_mm = max(radius_mm * 0.75, lo / 2)
            semi = radius_mm / self.mm_per_model * rng.uniform(0.8, 1.2, 3)
            center = np.array([a[i] for a, i in zip(grid.axes, np.unravel_index(
                candidates[rng.integers(candidates.size)], grid.shape))], float)
            shape = Superellipsoid(center, semi, rotation(*rng.uniform(0, 180, 3)))
            margin = 0.3 * semi.min() if code == 2 else 0.
            box = grid.box(*shape.bbox(margin + LOBULATION[code] * semi.max()))
            sdf = shape.sdf(*grid.coords(box))
            sigma_vox = np.maximum(0.5 * radius_mm / (np.abs(grid.step) * self.mm_per_model), 0.5)
            sdf = sdf + LOBULATION[code] * semi.min() * _smooth_noise(rng, sdf.shape, sigma_vox)
            inside = sdf <= 0
            organ = np.isin(self.tissue[box], LESION_ORGANS[code])
            n = int(inside.sum())
            if n == 0 or (inside & organ).sum() < MIN_INSIDE[code] * n or (self.lesion_type[box][inside] != 0).any():
                continue
            mask = inside & organ
            self._paint(code, box, sdf, mask, semi.min(), sigma_vox)
            self.lesion_type[box][mask] = code
            return int(mask.sum())
        return 0

    def _paint(self, code, box, sdf, mask, radius, sigma_vox):
        rng, hu = self.rng, self.hu[box]
        texture = _smooth_noise(rng, sdf.shape, sigma_vox / 3)
        if code == 1:  # solid nodule: soft-tissue density, replaces parenchyma and vessels
            hu[mask] = rng.uniform(10, 60) + 10 * texture[mask]
        elif code == 2:  # ground glass: raises the parenchyma only (vessels stay visible), fading at the border
            level = rng.uniform(-650, -350) + 40 * texture
            weight = np.clip(0.5 - sdf / (0.6 * radius), 0, 1)
            parenchyma = (self.tissue[box] == Tissue.LUNG) & (weight > 0)
            hu[parenchyma] += weight[parenchyma] * (level[parenchyma] - hu[parenchyma])  # weight 0.5 at the mask edge
        else:  # liver / kidney tumour: a few tens of HU below (hypo) or above (hyper) the organ
            organ_hu = self.tissue_hu[ORGAN_TISSUE[code]]
            delta = rng.uniform(20, 45) if code in (4, 6) else -rng.uniform(20, 45)
            hu[mask] = organ_hu + delta + 6 * texture[mask]
