"""Tests of the pure building blocks of Screener's dense SSL (nnscreener.ssl): crop pairs, colour jitter,
block masking and the DenseVICReg / DenseInfoNCE losses."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter1d

from nnscreener.preprocessing.body import body_mask_hu

from nnscreener.ssl.augment import ColourJitter, ColourJitterConfig
from nnscreener.ssl.crop_pairs import (CropBox, extract_crop, overlap_range, sample_crop_pair, sample_features,
                                       sample_overlap_positions, sample_positive_pairs, to_view_coords)
from nnscreener.ssl.losses import DenseInfoNCE, DenseVICReg, build_ssl_loss, info_nce, vicreg_terms
from nnscreener.ssl.masking import BlockMasking, random_block_mask
from nnscreener.utilities.errors import ScreenerInputError

REALCT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'realct')
# asymmetric, non-cubic shapes so that a swapped axis cannot pass
VOLUME_SHAPE = (37, 53, 71)
PATCH = (16, 24, 20)


def coordinate_volume(shape=VOLUME_SHAPE) -> np.ndarray:
    """(3, z, y, x) volume whose channels are its own z, y, x voxel coordinates (linear, so trilinear
    interpolation reproduces it exactly)."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing='ij'))


def interior(shape=VOLUME_SHAPE, margin=2) -> np.ndarray:
    """Foreground mask keeping `margin` voxels from the border: trilinear neighbours of positions in it never need
    padding (steps <= 4/3 < margin), so the coordinate volume stays exactly linear around them."""
    fg = np.zeros(shape, dtype=bool)
    fg[margin:-margin, margin:-margin, margin:-margin] = True
    return fg


def features_at(view: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return sample_features(torch.from_numpy(view[None]), torch.from_numpy(coords[None]).double())[0].numpy()


# ---------------------------------------------------------------- crop pairs
def test_positive_pairs_sample_the_same_source_position():
    vol, fg = coordinate_volume(), interior()
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(20):
        box1, box2 = sample_crop_pair(VOLUME_SHAPE, PATCH, rng)
        positions = sample_overlap_positions(box1, box2, PATCH, VOLUME_SHAPE, 50, rng, body=fg)
        for box in (box1, box2):
            view = extract_crop(vol, box, PATCH)
            assert view.shape == (3, *PATCH)
            coords = to_view_coords(positions, box, PATCH).astype(np.float32)
            np.testing.assert_allclose(features_at(view, coords), positions, atol=1e-4)
        sizes.append(np.abs(box1.size - box2.size).min())
    assert max(sizes) > 1  # the crops really had different sizes on every axis


def test_hand_made_boxes_zoom_in_and_out_per_axis():
    # very different, per-axis different steps: view 1 zooms in on z and out on x, view 2 the other way round
    vol = coordinate_volume()
    box1 = CropBox(start=np.array([5.25, 10.0, 3.5]), size=np.array([8.0, 36.0, 40.0]))   # steps 0.5, 1.5, 2.0
    box2 = CropBox(start=np.array([3.0, 12.5, 20.0]), size=np.array([24.0, 24.0, 10.0]))  # steps 1.5, 1.0, 0.5
    positions = np.array([[6.0, 20.0, 25.0], [10.1, 13.7, 24.3], [8.0, 30.3, 22.2]])
    for box in (box1, box2):
        coords = to_view_coords(positions, box, PATCH)
        np.testing.assert_allclose(features_at(extract_crop(vol, box, PATCH), coords), positions, atol=1e-6)
    # voxel j of view 1 is centred at start + j * step
    np.testing.assert_allclose(extract_crop(vol, box1, PATCH)[:, 2, 3, 4], [5.25 + 2 * 0.5, 10 + 3 * 1.5, 3.5 + 8])


def test_sample_positive_pairs_convenience_matches_across_views():
    vol = coordinate_volume()
    view1, view2, c1, c2 = sample_positive_pairs(vol, PATCH, 64, np.random.default_rng(3), body=interior())
    assert view1.shape == view2.shape == (3, *PATCH) and c1.shape == c2.shape == (64, 3)
    assert c1.dtype == c2.dtype == np.float32
    np.testing.assert_allclose(features_at(view1, c1), features_at(view2, c2), atol=1e-4)
    for c in (c1, c2):
        assert np.all(c >= 0) and np.all(c <= np.array(PATCH) - 1)


def test_sample_features_at_voxel_centres_is_indexing():
    feats = torch.randn(2, 4, 5, 6, 7)
    coords = torch.tensor([[[0, 0, 0], [4, 5, 6], [1, 2, 3]], [[3, 1, 6], [2, 5, 0], [4, 0, 1]]]).float()
    out = sample_features(feats, coords)
    assert out.shape == (2, 3, 4)
    for b in range(2):
        for i, (z, y, x) in enumerate(coords[b].long().tolist()):
            torch.testing.assert_close(out[b, i], feats[b, :, z, y, x])


@pytest.mark.parametrize('shape', [VOLUME_SHAPE, (10, 200, 90)])
def test_crop_pair_sizes_overlap_and_placement(shape):
    rng = np.random.default_rng(1)
    patch = np.array(PATCH)
    for _ in range(200):
        box1, box2 = sample_crop_pair(shape, PATCH, rng, scale_range=(0.5, 1.5), min_overlap=0.25)
        for box in (box1, box2):
            scale = box.size / patch
            assert np.all(scale >= 0.5 - 1e-9) and np.all(scale <= 1.5 + 1e-9)
            # capped at the volume's extent unless the range's lower end is larger
            assert np.all(box.size <= np.maximum(np.array(shape), 0.5 * patch) + 1e-9)
            lower_edge = box.start - box.step(PATCH) / 2
            fits = box.size <= np.array(shape)
            # crops lie inside the volume wherever they fit
            assert np.all((lower_edge >= -0.5 - 1e-9)[fits]) and np.all((lower_edge + box.size <= np.array(shape)
                                                                          - 0.5 + 1e-9)[fits])
        e1, e2 = box1.start - box1.step(PATCH) / 2, box2.start - box2.step(PATCH) / 2
        overlap = np.minimum(e1 + box1.size, e2 + box2.size) - np.maximum(e1, e2)
        need = np.minimum(0.25 * np.minimum(box1.size, box2.size), np.minimum(box1.size, np.array(shape)))
        assert np.all(overlap >= need - 1e-9)
        lo, hi = overlap_range(box1, box2, PATCH, shape)  # raises if the overlap misses the volume
        assert np.all(lo >= 0) and np.all(hi <= np.array(shape) - 1)


def test_extract_crop_pads_outside_the_volume():
    vol = np.ones((1, 10, 12, 14), dtype=np.float32)
    box = CropBox(start=np.array([-4.0, 0.0, 0.0]), size=np.array(PATCH, dtype=float))  # step 1
    view = extract_crop(vol, box, PATCH, pad_value=0.0)
    assert view.dtype == np.float32
    assert np.all(view[0, :4] == 0)  # source z < -0.5: padding
    assert np.all(view[0, 4:14, :12, :14] == 1)  # source voxels 0..9 copied
    assert np.all(view[0, 14:] == 0)


def test_positions_are_uniform_inside_the_body_and_filled():
    rng = np.random.default_rng(2)
    box = CropBox(start=np.zeros(3), size=np.array(PATCH, dtype=float))
    body = np.zeros(VOLUME_SHAPE, dtype=bool)
    body[:, :12] = True  # half of the overlap (y in 0..23)
    pos = sample_overlap_positions(box, box, PATCH, VOLUME_SHAPE, 2000, rng, body=body)
    assert pos.shape == (2000, 3)
    assert np.all(body[tuple(np.rint(pos).astype(int).T)])
    # uniform in the body part of the overlap, not piled up at one end of it (a "first candidates" bias would be)
    y = np.rint(pos[:, 1])
    assert abs((y <= 5).mean() - 6 / 11.5) < 0.05 and abs(pos[:, 0].mean() - (PATCH[0] - 1) / 2) < 0.5
    # no body in the overlap: falls back to uniform positions in it
    pos = sample_overlap_positions(box, box, PATCH, VOLUME_SHAPE, 200, rng, body=np.zeros_like(body))
    assert pos.shape == (200, 3) and np.all(pos >= 0) and np.all(pos <= np.array(PATCH) - 1)
    assert pos[:, 1].std() > 5  # spread over the whole overlap


@pytest.mark.skipif(not os.path.isdir(REALCT), reason='shared/realct is not beside the project')
def test_pairs_on_a_real_chest_ct_fall_in_the_lungs_as_often_as_the_lungs_fill_the_overlap():
    """Lung parenchyma gets SSL pairs in proportion to its share of the body in the overlap (an old "> -500 HU"
    foreground gave it none)."""
    image = sitk.ReadImage(os.path.join(REALCT, 'pulmonary_ct_cropped.nii.gz'))
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    body = body_mask_hu(hu, image.GetSpacing()[::-1])
    lung = body & (hu < -500)
    assert lung.sum() > 0.2 * body.sum()  # the lungs are inside the body (a cropped thorax cuts them open)
    rng = np.random.default_rng(0)
    in_lung, lung_share = [], []
    patch = (32, 48, 48)
    for _ in range(40):
        boxes = sample_crop_pair(hu.shape, patch, rng)
        positions = sample_overlap_positions(*boxes, patch, hu.shape, 256, rng, body=body)
        voxels = tuple(np.rint(positions).astype(int).T)
        in_lung.append(lung[voxels].mean())
        lo, hi = overlap_range(*boxes, patch, hu.shape)
        region = tuple(slice(int(np.ceil(a - 0.5)), int(np.floor(b + 0.5)) + 1) for a, b in zip(lo, hi))
        lung_share.append(lung[region].sum() / body[region].sum())
    assert np.mean(lung_share) > 0.1
    assert abs(np.mean(in_lung) - np.mean(lung_share)) < 0.03, (np.mean(in_lung), np.mean(lung_share))


def test_disjoint_crops_raise():
    a = CropBox(start=np.zeros(3), size=np.array(PATCH, dtype=float))
    b = CropBox(start=np.array([0.0, 30.0, 0.0]), size=np.array(PATCH, dtype=float))
    with pytest.raises(ValueError):
        overlap_range(a, b, PATCH, VOLUME_SHAPE)


# ---------------------------------------------------------------- colour jitter
OFF = dict(blur_or_sharpen_p=0.0, noise_p=0.0, brightness_p=0.0, contrast_p=0.0, gamma_p=0.0)


def only(**kwargs) -> ColourJitter:
    return ColourJitter(ColourJitterConfig(**{**OFF, **kwargs}))


def views(b=4, seed=0) -> torch.Tensor:
    return torch.rand(b, 1, 6, 10, 12, generator=torch.Generator().manual_seed(seed))


def test_colour_jitter_is_deterministic_per_generator_and_independent_per_sample():
    x = views(1).expand(8, -1, -1, -1, -1).contiguous()  # 8 copies of one view
    jitter = ColourJitter()
    a = jitter(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, jitter(x, torch.Generator().manual_seed(5)))
    assert not torch.allclose(a, jitter(x, torch.Generator().manual_seed(6)))
    # the copies are augmented differently
    assert len({round(float(a[i].mean()), 6) for i in range(8)}) == 8
    torch.testing.assert_close(only()(x), x)  # all probabilities 0: identity


def test_colour_jitter_intensity_ops():
    x, g = views(), torch.Generator().manual_seed(0)
    torch.testing.assert_close(only(brightness_p=1.0, brightness_range=(1.3, 1.3))(x, g), (x * 1.3).clamp(0, 1))
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(only(contrast_p=1.0, contrast_range=(0.5, 0.5))(x, g), (x - mean) * 0.5 + mean)
    torch.testing.assert_close(only(gamma_p=1.0, gamma_range=(2.0, 2.0))(x, g), x ** 2)
    noisy = only(noise_p=1.0, noise_sigma_range=(0.05, 0.05))(views(4, 1).repeat(1, 1, 4, 4, 4), g)
    assert abs(float((noisy - views(4, 1).repeat(1, 1, 4, 4, 4)).std()) - 0.05) < 0.003


def test_scaled_colour_jitter_shrinks_every_range_towards_the_identity():
    full = ColourJitterConfig()
    half = full.scaled(0.5)
    assert half.brightness_range == pytest.approx((0.9, 1.1)) and half.noise_sigma_range == pytest.approx((0, 0.05))
    assert half.sharpen_alpha_range == pytest.approx((0, 1)) and half.blur_or_sharpen_p == full.blur_or_sharpen_p
    assert half.gamma_range[0] * half.gamma_range[1] == pytest.approx(1.0)  # 0.8 .. 1.25 stays symmetric
    assert full.scaled(1.0) == full
    x = views(8)  # scale 0: whichever ops fire, none changes the view
    torch.testing.assert_close(ColourJitter(full.scaled(0.0))(x, torch.Generator().manual_seed(0)), x)
    weaker, stronger = (float((ColourJitter(full.scaled(s))(x, torch.Generator().manual_seed(1)) - x).abs().mean())
                        for s in (0.25, 1.0))
    assert 0 < weaker < stronger


def test_colour_jitter_probability_is_per_sample():
    x = views(400)
    out = only(brightness_p=0.5, brightness_range=(0.5, 0.5))(x, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(dim=1).float().mean()
    assert 0.4 < float(changed) < 0.6


def test_blur_and_sharpen_match_scipy_in_plane_gaussian():
    x = views(2)
    sigma = 0.8
    ref = x.numpy()
    for ax in (3, 4):  # y, x only; replicate padding = scipy 'nearest', radius ceil(3 sigma_max) = 3
        ref = gaussian_filter1d(ref, sigma, axis=ax, mode='nearest', truncate=3 / sigma)
    blur = only(blur_or_sharpen_p=1.0, blur_sigma_range=(sigma, sigma), sharpen_sigma_range=(sigma, sigma),
                sharpen_alpha_range=(1.5, 1.5))
    out = blur(x, torch.Generator().manual_seed(0))
    is_sharpened = ~torch.isclose(out, torch.from_numpy(ref), atol=1e-5).flatten(1).all(dim=1)
    expected = torch.from_numpy(ref)
    expected[is_sharpened] = x[is_sharpened] + 1.5 * (x[is_sharpened] - expected[is_sharpened])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # over many samples both branches occur
    many = blur(views(1).expand(64, -1, -1, -1, -1), torch.Generator().manual_seed(1))
    blurred = torch.isclose(many, torch.from_numpy(ref[:1]), atol=1e-5).flatten(1).all(dim=1)
    assert 10 < int(blurred.sum()) < 54


def test_colour_jitter_output_stays_in_unit_range_with_gamma():
    out = ColourJitter(ColourJitterConfig(gamma_p=1.0))(views(16), torch.Generator().manual_seed(0))
    assert float(out.min()) >= 0 and float(out.max()) <= 1


# ---------------------------------------------------------------- block masking
def test_block_mask_ratio_and_block_structure():
    block = (8, 12, 12)
    mask = random_block_mask(32, (32, 48, 48), block, ratio=0.6, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (32, 1, 32, 48, 48) and mask.dtype == torch.bool
    assert abs(float(mask.float().mean()) - 0.6) < 0.03
    # masks change value only at block borders of a (shifted) grid: change positions congruent mod block size
    for b in range(4):
        m = mask[b, 0]
        for ax, size in enumerate(block):
            changes = torch.nonzero(m.diff(dim=ax).transpose(0, ax).flatten(1).any(dim=1))
            assert len({int(c) % size for c in changes}) <= 1


def test_block_mask_probability_and_determinism():
    def mask(batch, p):
        return random_block_mask(batch, (16, 24, 24), (8, 12, 12), p=p, generator=torch.Generator().manual_seed(3))

    assert not mask(8, p=0.0).any()
    m = mask(200, p=0.5)
    assert 0.35 < float(m.flatten(1).any(dim=1).float().mean()) < 0.65
    torch.testing.assert_close(m, mask(200, p=0.5))


def test_block_masking_inserts_the_learned_token():
    masking = BlockMasking(block_size=(4, 6, 6), ratio=0.5, p=1.0, token_init=0.3)
    x = torch.rand(3, 1, 8, 12, 12)
    out, mask = masking(x, torch.Generator().manual_seed(0))
    assert torch.all(out[mask] == 0.3) and torch.equal(out[~mask], x[~mask])
    out.sum().backward()
    assert float(masking.mask_token.grad) == float(mask.sum()) > 0  # d sum / d token = number of masked voxels


# ---------------------------------------------------------------- losses
def numpy_vicreg(z1, z2, eps=1e-4):
    """VICReg terms written out in numpy (the reference arithmetic)."""
    n, d = z1.shape
    inv = ((z1 - z2) ** 2).sum() / (n * d)
    var = cov = 0.0
    for z in (z1, z2):
        zc = z - z.mean(axis=0)
        c = zc.T @ zc / (n - 1)
        var += np.maximum(0, 1 - np.sqrt(np.diag(c) + eps)).mean() / 2
        cov += ((c ** 2).sum() - (np.diag(c) ** 2).sum()) / d / 2
    return inv, var, cov


def test_vicreg_terms_by_hand():
    z1 = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [3.0, 2.0]])
    z2 = np.array([[0.5, 1.0], [2.0, -1.0], [1.0, 1.0], [3.0, 2.0]])
    # inv: squared differences 0.25 + 1 over N D = 8
    # view 1: var_z = 5/3, var_y = 2/3, cov = 1/3 -> var term ((1 - sqrt(5/3 + eps))^+ + (1 - sqrt(2/3 + eps)))/2
    terms = vicreg_terms(torch.tensor(z1), torch.tensor(z2))
    inv, var, cov = numpy_vicreg(z1, z2)
    assert inv == pytest.approx(1.25 / 8)
    np.testing.assert_allclose(np.cov(z1.T), [[5 / 3, 1 / 3], [1 / 3, 2 / 3]])
    assert float(terms['inv']) == pytest.approx(inv)
    assert float(terms['var']) == pytest.approx(var)
    assert float(terms['cov']) == pytest.approx(cov)
    assert cov == pytest.approx((2 * (1 / 3) ** 2 / 2 + 2 * np.cov(z2.T)[0, 1] ** 2 / 2) / 2)


def test_dense_vicreg_weights_and_invariance():
    rng = np.random.default_rng(0)
    y1, y2 = rng.normal(size=(2, 6, 5, 4))  # (B=6, n=5, d=4) -> N = 30 pooled pairs
    loss_fn = DenseVICReg(4, expander_dims=())
    loss, terms = loss_fn(torch.tensor(y1), torch.tensor(y2))
    inv, var, cov = numpy_vicreg(y1.reshape(30, 4), y2.reshape(30, 4))
    assert float(loss) == pytest.approx(25 * inv + 25 * var + 1 * cov)
    assert float(terms['cov']) == pytest.approx(cov)
    loss_same, terms_same = loss_fn(torch.tensor(y1), torch.tensor(y1))
    assert float(terms_same['inv']) == 0.0
    # aligned pairs beat shuffled ones
    perm = torch.tensor(rng.permutation(30))
    y2_aligned = torch.tensor(y1).reshape(30, 4) + 0.1 * torch.randn(30, 4, dtype=torch.float64)
    aligned, _ = loss_fn(torch.tensor(y1).reshape(30, 4), y2_aligned)
    shuffled, _ = loss_fn(torch.tensor(y1).reshape(30, 4), y2_aligned[perm])
    assert float(aligned) < float(shuffled)


def numpy_info_nce(z1, z2, tau):
    z = np.concatenate([z1, z2])
    n = len(z1)
    logits = z @ z.T / tau
    np.fill_diagonal(logits, -np.inf)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    positives = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return -log_softmax[np.arange(2 * n), positives].mean()


def test_info_nce_equals_numpy_log_softmax():
    z1 = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    z2 = np.array([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    # anchor z1[0]: positive <z1_0, z2_0> = 0.8, negatives z1_1, z1_2, z2_1, z2_2: 0, 0.6, 0, -1
    s = np.array([0.8, 0.0, 0.6, 0.0, -1.0]) / 0.5
    first_anchor = -(s[0] - np.log(np.exp(s).sum()))
    expected = numpy_info_nce(z1, z2, 0.5)
    assert first_anchor == pytest.approx(-np.log(np.exp(1.6) / (np.exp(1.6) + 2 + np.exp(1.2) + np.exp(-2.0))))
    assert float(info_nce(torch.tensor(z1), torch.tensor(z2), 0.5)) == pytest.approx(expected)


def test_dense_info_nce_normalises_and_prefers_aligned_pairs():
    rng = np.random.default_rng(1)
    y1 = torch.tensor(rng.normal(size=(4, 8, 6)))  # N = 32 pairs of 6-d descriptors
    y2 = y1 + 0.1 * torch.tensor(rng.normal(size=(4, 8, 6)))
    loss_fn = DenseInfoNCE(6, projector_dims=(), tau=0.1)
    loss, logs = loss_fn(y1, 3.0 * y2)  # scale must not matter: embeddings are L2-normalised
    z1 = y1.reshape(32, 6).numpy()
    z2 = y2.reshape(32, 6).numpy()
    z1, z2 = z1 / np.linalg.norm(z1, axis=1, keepdims=True), z2 / np.linalg.norm(z2, axis=1, keepdims=True)
    assert float(loss) == pytest.approx(numpy_info_nce(z1, z2, 0.1))
    assert float(logs['positive_cosine']) == pytest.approx((z1 * z2).sum(axis=1).mean())
    shuffled, _ = loss_fn(y1, y2.reshape(32, 6)[torch.tensor(rng.permutation(32))])
    assert float(loss) < float(shuffled)


def test_build_ssl_loss_trains_through_the_mlp():
    y1 = torch.randn(2, 16, 8, requires_grad=True)
    for name, kwargs in [('vicreg', dict(expander_dims=(32, 32))), ('infonce', dict(projector_dims=(32, 16)))]:
        loss_fn = build_ssl_loss(name, 8, **kwargs)
        loss, logs = loss_fn(y1, y1.detach() + 0.1 * torch.randn(2, 16, 8))
        loss.backward()
        assert torch.isfinite(loss) and all(not v.requires_grad for v in logs.values())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())
    assert isinstance(build_ssl_loss('vicreg', 4, expander_dims=(8,)), DenseVICReg)
    with pytest.raises(ScreenerInputError):
        build_ssl_loss('simclr', 8)
