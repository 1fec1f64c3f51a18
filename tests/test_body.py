"""The body mask (nnscreener.preprocessing.body): the patient with lungs, airways and bowel gas, without the table
and the room air; the mask every Screener stage and the evaluation use."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REALCT
from nnscreener.phantoms.anatomy import Tissue
from nnscreener.phantoms.generator import generate_phantom_case
from nnscreener.preprocessing.body import body_mask, body_mask_hu, hu_to_01, mask_bbox


@pytest.mark.parametrize('seed', [0, 1])  # seed 1 is a chest: lungs, airways; seed 0 an abdomen
def test_phantom_body_holds_the_patient_and_not_the_table(seed):
    case = generate_phantom_case(np.random.default_rng(seed), 'tiny', True)
    body = body_mask_hu(case.hu, case.spacing)
    share = {t: body[case.tissue == t].mean() for t in Tissue if (case.tissue == t).sum() > 20}
    for inside in (Tissue.MUSCLE, Tissue.LIVER, Tissue.LUNG, Tissue.LUNG_AIRWAY, Tissue.GAS, Tissue.FAT):
        assert share.get(inside, 1.0) > 0.97, (inside, share.get(inside))
    assert share[Tissue.SKIN] > 0.95
    for outside in (Tissue.AIR, Tissue.TABLE, Tissue.TABLE_FOAM):
        assert share[outside] < 0.02, (outside, share[outside])
    assert (case.lesion_type > 0).sum() == 0 or body[case.lesion_type > 0].mean() > 0.99
    if seed == 1:
        assert (case.tissue == Tissue.LUNG).sum() > 1000  # the chest case really has lungs (below -500 HU)
    # the same mask in the preprocessed [0, 1] units
    volume01 = (np.clip(case.hu, -1000, 300) + 1000) / 1300
    assert (body_mask(volume01, case.spacing) == body).mean() > 0.999


@pytest.mark.skipif(not os.path.isdir(REALCT), reason='shared/realct is not beside the project')
def test_real_scans_lungs_inside_room_air_and_table_outside():
    # a thorax cropped through the chest wall: the lungs reach the image edge and must still be inside
    image = sitk.ReadImage(os.path.join(REALCT, 'pulmonary_ct_cropped.nii.gz'))
    hu = sitk.GetArrayFromImage(image)
    body = body_mask_hu(hu, image.GetSpacing()[::-1])
    assert body[hu < -500].mean() > 0.9
    # an abdomen with air around it and the table (a 0.8 mm grid): air and table outside, the patient inside
    image = sitk.ReadImage(os.path.join(REALCT, 'CRLM-CT-1004_ct_nomask.nii.gz'))
    hu = sitk.GetArrayFromImage(image)
    body = body_mask_hu(hu, image.GetSpacing()[::-1])
    assert body[hu < -990].mean() < 0.01  # room air, bowel gas is a few voxels
    middle = hu[:, 256]  # a coronal row through the patient
    assert body[:, 256][(middle > 0) & (middle < 100)].mean() > 0.95
    assert 0.2 < body.mean() < 0.45
    table_rows = slice(400, 512)  # below the patient (posterior, LPS rows): the table is dense, but not body
    assert (hu[:, table_rows] > -500).sum() > 1000 and body[:, table_rows].sum() < 0.01 * body.sum()


def test_bbox_is_grown_to_the_patch_and_kept_inside():
    mask = np.zeros((10, 30, 30), bool)
    mask[4:6, 1:3, 20:29] = True
    bbox = mask_bbox(mask, (4, 8, 8))
    assert bbox == [(3, 7), (0, 8), (20, 29)]
    assert mask_bbox(np.zeros((5, 5, 5), bool), (2, 2, 2)) == [(0, 5)] * 3
    assert hu_to_01(-1000) == 0 and hu_to_01(300) == 1
