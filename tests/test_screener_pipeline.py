"""End to end on tiny phantoms: modular and distilled anomaly maps, evaluation, and the distilled UNet as
`-pretrained_weights` of stock `nnUNetv2_train`."""
import glob
import json
import os
import subprocess
from os.path import join

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TARGET_ID
from nnscreener.inference.predict import predict
from nnscreener.phantoms.planted import plant_sphere

NAME = 'Dataset501_ScreenerPhantomLesions'


def _labeled_cases(env, n=3):
    images = sorted(glob.glob(join(env['nnUNet_raw'], NAME, 'imagesTr', '*_0000.nii.gz')))[:n]
    labels = [f.replace('imagesTr', 'labelsTr').replace('_0000.nii.gz', '.nii.gz') for f in images]
    return images, labels


def _lesion_vs_surrounding(map_file, label_file):
    """Mean map inside the lesions and in the healthy tissue around them (a 4-voxel shell)."""
    from scipy.ndimage import binary_dilation
    anomaly = sitk.GetArrayFromImage(sitk.ReadImage(map_file))
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(label_file)) > 0
    shell = binary_dilation(lesion, iterations=4) & ~lesion
    return anomaly[lesion].mean(), anomaly[shell].mean()


def test_modular_map_scores_lesions_above_the_healthy_tissue_around_them(pretrained_world, monkeypatch, tmp_path):
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    images, labels = _labeled_cases(env)
    records = predict(images, str(tmp_path), TARGET_ID, 'modular', 'cpu', overlays=1)
    assert len(records) == len(images) and os.path.isfile(join(tmp_path, 'scores.csv'))
    assert glob.glob(join(tmp_path, 'overlays', '*.png'))
    for record, image, label in zip(sorted(records, key=lambda r: r['case']), images, labels):
        geometry = sitk.ReadImage(image), sitk.ReadImage(record['anomaly_map'])
        assert geometry[0].GetSize() == geometry[1].GetSize()
        np.testing.assert_allclose(geometry[0].GetDirection(), geometry[1].GetDirection())
        # the lesions were never seen in pretraining (the target set is held out), like the paper's test sets
        lesion, surrounding = _lesion_vs_surrounding(record['anomaly_map'], label)
        assert lesion > surrounding, (record['case'], lesion, surrounding)


def test_evaluate_cli_on_modular_maps(pretrained_world, tmp_path):
    env, _ = pretrained_world
    images, labels = _labeled_cases(env)
    subprocess.run(['nnScreener_predict', '-i', *images, '-o', str(tmp_path / 'maps'), '-d', str(TARGET_ID),
                    '-device', 'cpu'], env={**os.environ, **env}, check=True, capture_output=True)
    result = subprocess.run(['nnScreener_evaluate', '-pred', str(tmp_path / 'maps'), '-ref',
                             os.path.dirname(labels[0]), '-o', str(tmp_path / 'eval'), '--n_threshold_cases', '1'],
                            env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(tmp_path / 'eval' / 'summary.json'))
    assert summary['n_pathological'] == len(images)
    for metric in ('auroc', 'auroc_up_to_fpr', 'aupro_up_to_fpr', 'dice_mean'):
        assert 0 <= summary[metric] <= 1, (metric, summary[metric])


DISTILLATION_STEPS = 2400  # the tiny preset's 300 steps give a student that knows above/below the mean, not the top


def test_distilled_map_ranks_the_teachers_top_voxels_high(pretrained_world, monkeypatch, tmp_path):
    """The distilled UNet must keep the teacher's ranking where it matters, among the more anomalous voxels: over the
    body voxels above the teacher's median, the student's map correlates with the teacher's (Spearman, mean over two
    scans > 0.52), and the student's top 1 % holds more than 15 % of the teacher's top 1 % (chance: 1 %). Measured
    (one thread): 0.59 and 0.26; with the target clamped at its mean (a saturating target, no order above the clamp)
    0.48 and 0.08, which fails. The student is distilled anew, longer, from the pretrained world's teacher, in copies
    of its nnU-Net folders."""
    import shutil
    from scipy.stats import spearmanr
    from nnscreener.preprocessing.body import body_mask_of_image
    from nnscreener.run.pretrain import pretrain
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    images, _ = _labeled_cases(env, n=2)
    teacher_maps = [_map(r) for r in sorted(predict(images, str(tmp_path / 'modular'), TARGET_ID, 'modular', 'cpu'),
                                            key=lambda r: r['case'])]
    for folder in ('nnUNet_preprocessed', 'nnUNet_results'):
        shutil.copytree(join(env[folder], NAME), tmp_path / folder / NAME,
                        ignore=shutil.ignore_patterns('nnScreenerDistillationTrainer__*'))
        monkeypatch.setenv(folder, str(tmp_path / folder))
    plans_file = tmp_path / 'nnUNet_preprocessed' / NAME / 'nnScreenerPlans.json'
    plans = json.load(open(plans_file))
    plans['screener']['distillation']['num_steps'] = DISTILLATION_STEPS
    json.dump(plans, open(plans_file, 'w'))
    pretrain(TARGET_ID, stages=['distillation'], device='cpu')
    student_maps = [_map(r) for r in sorted(predict(images, str(tmp_path / 'distilled'), TARGET_ID, 'distilled',
                                                    'cpu'), key=lambda r: r['case'])]
    rho_upper, top_overlap = [], []
    for image, teacher, student in zip(images, teacher_maps, student_maps):
        body = body_mask_of_image(sitk.ReadImage(image))
        teacher, student = teacher[body], student[body]
        upper = teacher >= np.median(teacher)
        rho_upper.append(spearmanr(teacher[upper], student[upper])[0])
        k = int(np.ceil(0.01 * teacher.size))
        top_overlap.append(len(np.intersect1d(np.argsort(teacher)[-k:], np.argsort(student)[-k:])) / k)
    assert np.mean(rho_upper) > 0.52 and np.mean(top_overlap) > 0.15, (rho_upper, top_overlap)


def _map(record) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(record['anomaly_map']))


def test_distilled_checkpoint_predicts_and_fine_tunes_in_stock_nnunet(pretrained_world, tmp_path):
    env, _ = pretrained_world
    run_env = {**os.environ, **env}
    images, _ = _labeled_cases(env, n=1)
    subprocess.run(['nnScreener_predict', '-i', images[0], '-o', str(tmp_path / 'maps'), '-d', str(TARGET_ID),
                    '--model', 'distilled', '-device', 'cpu'], env=run_env, check=True, capture_output=True)
    assert sitk.ReadImage(str(tmp_path / 'maps' / os.path.basename(images[0]).replace('_0000.nii.gz', '.nii.gz'))).GetSize() == \
        sitk.ReadImage(images[0]).GetSize()
    env_results = run_env['nnUNet_results']
    distilled = join(env_results, NAME, 'nnScreenerDistillationTrainer__nnScreenerPlans__3d_fullres', 'fold_all',
                     'checkpoint_final.pth')
    result = subprocess.run(['nnUNetv2_train', str(TARGET_ID), '3d_fullres', '0', '-p', 'nnScreenerPlans', '-tr',
                             'nnScreenerFinetuneTrainer_tiny', '-device', 'cpu', '-pretrained_weights', distilled],
                            env=run_env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'Loading pretrained weights' in result.stdout
    fold = join(env_results, NAME, 'nnScreenerFinetuneTrainer_tiny__nnScreenerPlans__3d_fullres', 'fold_0')
    assert os.path.isfile(join(fold, 'checkpoint_final.pth'))
    assert os.path.isfile(join(fold, 'validation', 'summary.json'))
    # the fine-tuned network started from the distilled weights (a few SGD steps keep them close; a random
    # init would be uncorrelated), except the re-initialised seg_layers
    distilled_weights = torch.load(distilled, weights_only=True)['network_weights']
    tuned = torch.load(join(fold, 'checkpoint_final.pth'), weights_only=False)['network_weights']  # stock nnU-Net's
    assert set(distilled_weights) == set(tuned)
    key = 'encoder.stages.0.0.convs.0.conv.weight'
    correlation = np.corrcoef(distilled_weights[key].flatten(), tuned[key].flatten())[0, 1]
    assert correlation > 0.8, correlation


def test_checkpoint_that_does_not_fit_the_plans_is_a_one_line_error(pretrained_world, monkeypatch, tmp_path):
    import shutil
    from nnscreener.utilities.errors import ScreenerInputError
    env, _ = pretrained_world
    trainer_folder = 'nnScreenerDistillationTrainer__nnScreenerPlans__3d_fullres'
    copy = tmp_path / 'nnUNet_results' / NAME / trainer_folder
    shutil.copytree(join(env['nnUNet_results'], NAME, trainer_folder), copy)
    plans = json.load(open(copy / 'plans.json'))
    arch = plans['configurations']['3d_fullres']['architecture']['arch_kwargs']
    arch['features_per_stage'] = [2 * f for f in arch['features_per_stage']]  # plans edited after training
    json.dump(plans, open(copy / 'plans.json', 'w'))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'nnUNet_results'))
    images, _ = _labeled_cases(env, n=1)
    with pytest.raises(ScreenerInputError, match='does not fit its plans') as info:
        predict(images, str(tmp_path / 'maps'), TARGET_ID, 'distilled', 'cpu')
    assert '\n' not in str(info.value)


def _maps_of_healthy_and_planted(images, planted_file, out, kind, trainer=None):
    maps = []
    for image, name in ((images[0], 'healthy_maps'), (planted_file, 'planted_maps')):
        record, = predict([image], str(out / name), TARGET_ID, kind, 'cpu',
                          density_trainer=trainer if kind == 'modular' else None)
        maps.append(sitk.GetArrayFromImage(sitk.ReadImage(record['anomaly_map'])))
    return maps


@pytest.mark.parametrize('trainer', [None, 'nnScreenerDensityTrainer_flow', 'nnScreenerDensityTrainer_sincosGaussian',
                                     'nnScreenerDensityTrainer_marginalGaussian'])
def test_density_variants_answer_a_planted_lesion_where_it_is(pretrained_world, monkeypatch, tmp_path, trainer):
    """Every density model of the paper's ablation (on the same descriptor and condition models) is trained and served
    by `nnScreener_predict`; a -500 HU sphere planted in soft tissue changes its map where the sphere is, far more than
    15 mm away. Whether the change is a rise is not asserted here: at the tiny preset it is not reliably one (measured
    in documentation/benchmarks.md); that every density model scores rare outliers high is tested in test_density.py,
    and that the default model scores real phantom lesions above their surroundings above."""
    from scipy.ndimage import distance_transform_edt
    from nnscreener.run.pretrain import pretrain
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    images, _ = _labeled_cases(env, n=1)
    blob, body = plant_sphere(images[0], str(tmp_path / 'planted_0000.nii.gz'))
    if trainer is not None:  # the default density model was trained with the pretrained world
        pretrain(TARGET_ID, stages=['density'], device='cpu', density_trainer=trainer)
    healthy, planted = _maps_of_healthy_and_planted(images, str(tmp_path / 'planted_0000.nii.gz'), tmp_path, 'modular',
                                                    trainer)
    spacing = sitk.ReadImage(images[0]).GetSpacing()[::-1]
    far = body & (distance_transform_edt(~blob, sampling=spacing) > 15)
    change = np.abs(planted - healthy)
    assert change[blob].mean() > 10 * change[far].mean(), (change[blob].mean(), change[far].mean())


def test_benchmark_baselines_score_a_planted_lesion_high(pretrained_world, monkeypatch, tmp_path):
    """The non-Screener baselines of benchmarks/quality, q(HU | position) and the autoencoder's reconstruction
    error: a -500 HU sphere planted in soft tissue must raise their map there, above most of the body."""
    from nnscreener.run.pretrain import pretrain
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    images, _ = _labeled_cases(env, n=1)
    blob, body = plant_sphere(images[0], str(tmp_path / 'planted_0000.nii.gz'))
    runs = {'intensity': ('intensity', 'nnScreenerIntensityTrainer'),
            'autoencoder': ('autoencoder', 'nnScreenerAutoencoderTrainer')}
    for name, (kind, trainer) in runs.items():
        pretrain(TARGET_ID, stages=['density'], device='cpu', density_trainer=trainer)
        healthy, planted = _maps_of_healthy_and_planted(images, str(tmp_path / 'planted_0000.nii.gz'),
                                                        tmp_path / name, kind, trainer)
        assert planted[blob].mean() > healthy[blob].mean(), name
        assert (planted[body & ~blob] < planted[blob].mean()).mean() > 0.75, name
    checkpoint = torch.load(join(env['nnUNet_results'], NAME, 'nnScreenerIntensityTrainer__nnScreenerPlans__3d_fullres',
                                 'fold_all', 'checkpoint_final.pth'), weights_only=True)
    assert any(k.startswith('logit_net.') for k in checkpoint['network_weights'])  # the histogram of HU values
