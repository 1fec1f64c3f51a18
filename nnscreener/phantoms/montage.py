"""A PNG montage of a few cases of a phantom dataset, so a person can judge at a glance whether it looks like CT."""
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from scipy.ndimage import binary_fill_holes, label  # noqa: E402

from nnscreener.utilities.io import read_image  # noqa: E402

LUNG_WINDOW = (-600, 1500)  # (level, width) in HU
SOFT_WINDOW = (40, 400)


def _read_lps(path: str):
    """Array (z, y, x) reoriented so that x runs to the patient's left, y posterior, z superior, and its spacing."""
    image = sitk.DICOMOrient(read_image(path), 'LPS')
    return sitk.GetArrayFromImage(image), image.GetSpacing()[::-1]


def _show(ax, image, mask, window, aspect, title, coronal=False):
    level, width = window
    origin = 'lower' if coronal else 'upper'  # coronal: superior up; axial: anterior up, patient's right on the left
    ax.imshow(image, cmap='gray', vmin=level - width / 2, vmax=level + width / 2, aspect=aspect, origin=origin,
              interpolation='nearest')
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors='red', linewidths=0.8)  # follows imshow's origin
    ax.set_title(title, fontsize=8)
    ax.axis('off')


def _inside_body(hu):
    """Voxels inside the body outline: slice-wise filled largest component above -500 HU (lungs become holes)."""
    labels, n = label(hu > -500)
    if n == 0:
        return np.zeros(hu.shape, bool)
    body = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return np.stack([binary_fill_holes(s) for s in body])


def _case_row(axes, name, hu, lesion, spacing, type_names):
    body = _inside_body(hu)
    lung_voxels, soft_voxels = body & (hu > -950) & (hu < -700), body & (hu > 30) & (hu < 90)
    lung, soft = lung_voxels.sum((1, 2)), soft_voxels.sum((1, 2))
    z_lung, z_abd = int(np.argmax(lung)), int(np.argmax(soft - lung))
    present = [int(c) for c in np.unique(lesion) if c]
    if present:
        areas = (lesion > 0).sum((0, 2))
        y_cor = int(np.argmax(areas))
        z_les = int(np.argmax((lesion > 0).sum((1, 2))))
        lung_lesion = any(type_names[str(c)] in ('solid_nodule', 'ground_glass') for c in np.unique(lesion[z_les]) if c)
    else:  # coronal through most lung, or most soft tissue when the scan holds no lung
        lung_y, soft_y = lung_voxels.sum((0, 2)), soft_voxels.sum((0, 2))
        y_cor, z_les, lung_lesion = int(np.argmax(lung_y if lung_y.max() > 100 else soft_y)), None, False
    axial_aspect, coronal_aspect = spacing[1] / spacing[2], spacing[0] / spacing[2]
    _show(axes[0], hu[z_lung], lesion[z_lung] > 0, LUNG_WINDOW, axial_aspect, f'{name} axial z={z_lung} (lung)')
    _show(axes[1], hu[z_abd], lesion[z_abd] > 0, SOFT_WINDOW, axial_aspect, f'axial z={z_abd} (soft tissue)')
    if z_les is None:
        axes[2].axis('off')
        axes[2].set_title('no lesion', fontsize=8)
    else:
        names = ', '.join(type_names[str(c)] for c in np.unique(lesion[z_les]) if c)
        _show(axes[2], hu[z_les], lesion[z_les] > 0, LUNG_WINDOW if lung_lesion else SOFT_WINDOW, axial_aspect,
              f'axial z={z_les}: {names}')
    _show(axes[3], hu[:, y_cor], lesion[:, y_cor] > 0, LUNG_WINDOW if lung_lesion or not present else SOFT_WINDOW,
          coronal_aspect, f'coronal y={y_cor}', coronal=True)


def save_montage(dataset_folder: str, out_file: str | None = None, max_cases: int = 3, title: str | None = None) -> str:
    """Plot up to `max_cases` cases (those with lesions first) of a phantom dataset: axial lung-window and
    soft-tissue slices, the slice with most lesion, and a coronal slice, lesions outlined in red. Returns the path
    (default `<dataset_folder>/montage.png`). `title` defaults to the folder name."""
    with open(os.path.join(dataset_folder, 'dataset.json')) as f:
        dataset = json.load(f)
    ending, type_names = dataset['file_ending'], dataset['nnscreener_lesion_types']
    cases = sorted(f[:-len(ending)] for f in os.listdir(os.path.join(dataset_folder, 'lesion_typesTr')))
    with_lesions = set(dataset.get('nnscreener_cases_with_lesions', []))
    chosen = ([c for c in cases if c in with_lesions] + [c for c in cases if c not in with_lesions])[:max_cases]
    fig, axes = plt.subplots(len(chosen), 4, figsize=(16, 4.2 * len(chosen)), squeeze=False)
    for row, case in zip(axes, chosen):
        hu, spacing = _read_lps(os.path.join(dataset_folder, 'imagesTr', f'{case}_0000{ending}'))
        lesion, _ = _read_lps(os.path.join(dataset_folder, 'lesion_typesTr', f'{case}{ending}'))
        _case_row(row, case, hu, lesion, spacing, type_names)
    title = title or os.path.basename(os.path.normpath(dataset_folder))
    fig.suptitle(f'{title} (lung window W1500/L-600, soft tissue '
                 f'W400/L40; red: lesion outline)', fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # leave room for the title
    out_file = out_file or os.path.join(dataset_folder, 'montage.png')
    fig.savefig(out_file, dpi=80)
    plt.close(fig)
    return out_file
