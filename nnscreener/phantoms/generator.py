"""CT phantom cases: a randomised torso (anatomy.py) placed in a scanner geometry, converted to HU with partial-volume
blur and correlated noise, with optional lesions (lesions.py).

`generate_phantom_case(rng, preset, with_lesions)` is deterministic given the state of `rng`.
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from nnscreener.phantoms.anatomy import BodyModel, Tissue
from nnscreener.phantoms.lesions import LesionPainter
from nnscreener.phantoms.shapes import Grid
from nnscreener.utilities.errors import ScreenerInputError

# mean HU of each tissue and the sd of its per-patient jitter (non-contrast CT)
TISSUE_HU = {
    Tissue.AIR: (-1000, 0), Tissue.SKIN: (30, 5), Tissue.FAT: (-100, 10), Tissue.FAT_VISCERAL: (-95, 10),
    Tissue.MUSCLE: (50, 5), Tissue.LUNG: (-855, 25), Tissue.LUNG_VESSEL: (40, 5), Tissue.LUNG_AIRWAY: (-1000, 0),
    Tissue.LUNG_AIRWAY_WALL: (20, 10), Tissue.AIRWAY: (-1000, 0), Tissue.SOFT: (40, 5), Tissue.BLOOD: (42, 5),
    Tissue.HEART: (42, 5), Tissue.LIVER: (60, 6), Tissue.SPLEEN: (48, 4), Tissue.KIDNEY: (32, 4),
    Tissue.FLUID: (8, 4), Tissue.GAS: (-1000, 0), Tissue.STOOL: (-40, 30), Tissue.CARTILAGE: (110, 15),
    Tissue.BONE_CANCELLOUS: (230, 50), Tissue.BONE_CORTICAL: (1000, 150), Tissue.TABLE: (300, 50),
    Tissue.TABLE_FOAM: (-900, 20)}
FOV_KINDS = ('chest', 'abdomen', 'chest_abdomen')


@dataclass(frozen=True)
class PhantomPreset:
    """Size and sampling of generated cases; lengths in world mm."""
    name: str
    matrix: int  # in-plane voxels (y and x)
    spacing_xy: tuple  # in-plane spacing range; raised where the patient would not fit the field of view
    spacing_z: tuple  # slice spacings to choose from
    max_slices: int
    z_extent: tuple | None  # scanned length range; None: a random part (>= 80 %) of the chosen anatomical window
    min_z_extent: float
    body_scale: tuple  # patient size relative to the adult body model
    lesions_per_case: tuple  # (min, max) lesions of a case that has lesions
    lesion_diameter: dict = field(default_factory=dict)  # lesion code -> (min, max) diameter


PRESETS = {
    # CPU tests: ~40 x 96 x 96, a child-sized torso; one case takes a fraction of a second
    'tiny': PhantomPreset('tiny', matrix=96, spacing_xy=(1.6, 2.0), spacing_z=(2.0, 2.25, 2.5), max_slices=50,
                          z_extent=(80., 100.), min_z_extent=80., body_scale=(0.42, 0.48), lesions_per_case=(1, 2),
                          lesion_diameter={1: (5, 16), 2: (10, 28), 3: (8, 25), 4: (8, 25), 5: (6, 16), 6: (6, 16)}),
    # clinical-looking scans: 512 x 512, 0.6-1.0 mm pixels, 1-5 mm slices covering chest, abdomen or both
    'default': PhantomPreset('default', matrix=512, spacing_xy=(0.6, 1.0),
                             spacing_z=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0), max_slices=224, z_extent=None,
                             min_z_extent=160., body_scale=(0.9, 1.1), lesions_per_case=(1, 3),
                             lesion_diameter={1: (3, 30), 2: (10, 50), 3: (8, 60), 4: (8, 60), 5: (8, 40),
                                              6: (8, 40)}),
}


class PhantomCase(NamedTuple):
    """One generated CT. Arrays are (z, y, x); spacing is (z, y, x) in mm like nnU-Net's; origin (x, y, z) and the
    row-major 3x3 direction are in SimpleITK's convention (LPS), exactly what is written to the NIfTI files."""
    hu: np.ndarray  # int16 HU
    lesion_type: np.ndarray  # uint8 codes of LESION_TYPES, 0 = no lesion
    spacing: tuple
    origin: tuple
    direction: tuple
    tissue: np.ndarray  # uint8 codes of anatomy.Tissue (before lesions)


def get_preset(preset) -> PhantomPreset:
    if isinstance(preset, PhantomPreset):
        return preset
    if preset not in PRESETS:
        raise ScreenerInputError(f'unknown phantom preset {preset!r}; choose one of {", ".join(PRESETS)}')
    return PRESETS[preset]


def generate_phantom_case(rng: np.random.Generator, preset='tiny', with_lesions: bool = True) -> PhantomCase:
    """One phantom CT: anatomy, scanner geometry, HU with blur and noise and, if `with_lesions`, 1..n lesions."""
    preset = get_preset(preset)
    scale = rng.uniform(*preset.body_scale)
    mm_per_model = np.array([scale, scale * rng.uniform(0.93, 1.07), scale * rng.uniform(0.93, 1.07)])
    # the smallest vessel drawn is about a third of a voxel wide: thinner ones would vanish in the blur anyway
    body = BodyModel(rng, min_vessel_radius=max(0.45, 0.3 * np.mean(preset.spacing_xy) / scale))
    grid, spacing, origin, direction = _sample_geometry(rng, preset, body, mm_per_model)
    tissue = body.render(grid)
    tissue_hu = np.array([rng.normal(*TISSUE_HU[t]) for t in Tissue], np.float32)
    hu = tissue_hu[tissue]
    _lung_gradient(rng, hu, tissue, grid, body)
    lesion_type = np.zeros(grid.shape, np.uint8)
    if with_lesions:
        _add_lesions(rng, preset, hu, tissue, lesion_type, grid, mm_per_model, tissue_hu)
    hu = _scanner(rng, hu, spacing)
    return PhantomCase(hu, lesion_type, spacing, origin, direction, tissue)


def _sample_geometry(rng, preset: PhantomPreset, body: BodyModel, mm_per_model):
    """Field of view, spacing, axis flips and world position; returns the model-mm grid and the image geometry."""
    lo, hi = body.landmarks()[FOV_KINDS[rng.integers(len(FOV_KINDS))]]
    if preset.z_extent is not None:
        extent = rng.uniform(*preset.z_extent)
    else:
        extent = max((hi - lo) * mm_per_model[0] * rng.uniform(0.8, 1.0), preset.min_z_extent)
    fits = [s for s in preset.spacing_z if extent / s <= preset.max_slices]
    spacing_z = float(rng.choice(fits)) if fits else max(preset.spacing_z)
    nz = int(np.clip(round(extent / spacing_z), 1, preset.max_slices))
    extent = nz * spacing_z
    length = extent / mm_per_model[0]  # scanned length in model mm
    z0 = lo + rng.uniform(0, max(0., hi - lo - length))  # model z where the scan starts
    if length > hi - lo:
        z0 = (lo + hi - length) / 2

    zs = np.linspace(z0, z0 + length, 64)
    width = 2 * float(body.p('width', zs).max()) * mm_per_model[2]
    depth = float((body.p('ant', zs) + body.p('post', zs)).max()) * mm_per_model[1]
    need = (width + 16) / preset.matrix  # the whole patient fits, whatever the preset's range says
    wanted = np.clip((width + rng.uniform(30, 120)) / preset.matrix, *preset.spacing_xy)
    spacing_xy = round(float(max(need, wanted)), 3)
    fov = preset.matrix * spacing_xy
    spacing = (round(spacing_z, 3), spacing_xy, spacing_xy)
    shape = (nz, preset.matrix, preset.matrix)
    flips = np.where(rng.uniform(size=3) < (0.4, 0.15, 0.15), -1, 1)  # (z, y, x); a reversed z is common in DICOM

    # world (LPS) centre of the field of view; the body axis sits off-centre by up to 1/4 (x) and 1/8 (y) of the
    # spare room
    centre = np.array([rng.uniform(-700, 100), rng.uniform(-30, 30), rng.uniform(-20, 20)])  # (z, y, x)
    body_axis = centre[1:] + [rng.uniform(-1, 1) * max(0., fov - depth - 20) / 8,
                              rng.uniform(-1, 1) * max(0., fov - width - 16) / 4]
    origin_zyx = np.round(centre - flips * (np.array(shape) - 1) / 2 * spacing, 2)
    world = [origin_zyx[k] + flips[k] * np.arange(shape[k]) * spacing[k] for k in range(3)]
    model_z = (world[0] - centre[0]) / mm_per_model[0] + z0 + length / 2
    grid = Grid((model_z, (world[1] - body_axis[0]) / mm_per_model[1], (world[2] - body_axis[1]) / mm_per_model[2]))
    direction = tuple(float(v) for v in np.diag(flips[::-1]).ravel())
    return grid, spacing, tuple(float(v) for v in origin_zyx[::-1]), direction


def _lung_gradient(rng, hu, tissue, grid, body):
    """Dependent (posterior) lung is denser in a supine patient: +20..60 HU from front to back."""
    box = grid.box((body.dome_z.min() - 100, -200, -200), (body.apex_z, 200, 200))
    if box is None:
        return
    _, y, _ = grid.coords(box)
    gain = rng.uniform(20, 60) / 200
    view = hu[box]
    lung = tissue[box] == Tissue.LUNG
    view += np.where(lung, np.broadcast_to(gain * y, view.shape), np.float32(0))


def _add_lesions(rng, preset, hu, tissue, lesion_type, grid, mm_per_model, tissue_hu):
    painter = LesionPainter(rng, hu, tissue, lesion_type, grid, mm_per_model, tissue_hu, preset.lesion_diameter)
    types = painter.available_types()
    if not types:
        raise RuntimeError('phantom field of view holds no organ that can carry a lesion')
    wanted = int(rng.integers(preset.lesions_per_case[0], preset.lesions_per_case[1] + 1))
    placed, tries = 0, 0
    while placed < wanted and tries < 4 * wanted + 8:
        placed += painter.add(int(rng.choice(types))) > 0
        tries += 1
    if placed == 0:
        raise RuntimeError('could not place any lesion in the phantom case')


def _scanner(rng, hu, spacing):
    """Partial-volume blur (slice profile and in-plane resolution) plus in-plane-correlated noise of 10-20 HU sd."""
    blur = (0.4, max(0.5, 0.6 / spacing[1]), max(0.5, 0.6 / spacing[2]))
    out = gaussian_filter(hu, blur)
    corr = rng.uniform(0.6, 1.0)
    delta = np.zeros(33, np.float32)
    delta[16] = 1
    gain = rng.uniform(10, 20) / float(np.sum(gaussian_filter1d(delta, corr) ** 2))  # unit-sd noise after the filter
    noise = gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), (0, corr, corr))
    out += noise * gain
    np.clip(out, -1024, 3071, out=out)
    return np.rint(out).astype(np.int16)
