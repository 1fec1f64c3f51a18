"""End to end on tiny phantoms: modular and distilled anomaly maps, evaluation, and the distilled UNet as
`-pretrained_weights` of stock `nnUNetv2_train`."""
import glob
import json
import os
import subprocess
from os.path import join

import numpy as np
import SimpleITK as sitk
import torch

from conftest import TARGET_ID
from nnscreener.inference.predict import predict

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


def test_density_variants_train_and_serve_the_modular_model(pretrained_world, monkeypatch, tmp_path):
    from nnscreener.run.pretrain import pretrain
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    images, _ = _labeled_cases(env, n=1)
    pretrain(TARGET_ID, stages=['density'], device='cpu', density_trainer='nnScreenerDensityTrainer_flow')
    record, = predict(images, str(tmp_path / 'flow'), TARGET_ID, 'modular', 'cpu',
                      density_trainer='nnScreenerDensityTrainer_flow')
    anomaly = sitk.GetArrayFromImage(sitk.ReadImage(record['anomaly_map']))
    assert np.isfinite(anomaly).all() and anomaly.std() > 0
    pretrain(TARGET_ID, stages=['density'], device='cpu', density_trainer='nnScreenerDensityTrainer_sincosGaussian')
    record, = predict(images, str(tmp_path / 'sincos'), TARGET_ID, 'modular', 'cpu',
                      density_trainer='nnScreenerDensityTrainer_sincosGaussian')
    anomaly = sitk.GetArrayFromImage(sitk.ReadImage(record['anomaly_map']))
    assert np.isfinite(anomaly).all() and anomaly.std() > 0


def test_checkpoint_that_does_not_fit_the_plans_is_a_one_line_error(pretrained_world, monkeypatch, tmp_path):
    import shutil
    import pytest
    from nnscreener.utilities.errors import ScreenerInputError
    env, _ = pretrained_world
    trainer_folder = 'nnScreenerDistillationTrainer__nnScreenerPlans__3d_fullres'
    copy = tmp_path / NAME / trainer_folder
    shutil.copytree(join(env['nnUNet_results'], NAME, trainer_folder), copy)
    plans = json.load(open(copy / 'plans.json'))
    arch = plans['configurations']['3d_fullres']['architecture']['arch_kwargs']
    arch['features_per_stage'] = [2 * f for f in arch['features_per_stage']]  # plans edited after training
    json.dump(plans, open(copy / 'plans.json', 'w'))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv('nnUNet_results', str(tmp_path))
    images, _ = _labeled_cases(env, n=1)
    with pytest.raises(ScreenerInputError, match='does not fit its plans') as info:
        predict(images, str(tmp_path / 'maps'), TARGET_ID, 'distilled', 'cpu')
    assert '\n' not in str(info.value)


def _plant_hypodense_blob(image_file, out_file, radius_mm=6.0, hu=-500):
    """Writes the CT with a -500 HU sphere in the middle of its soft tissue; returns the sphere and body masks."""
    from scipy.ndimage import binary_erosion
    image = sitk.ReadImage(image_file)
    ct = sitk.GetArrayFromImage(image)
    soft_tissue = np.argwhere(binary_erosion((ct > 0) & (ct < 120), iterations=3))
    centre = soft_tissue[len(soft_tissue) // 2]
    grid = np.indices(ct.shape).transpose(1, 2, 3, 0)
    blob = (((grid - centre) * image.GetSpacing()[::-1]) ** 2).sum(-1) < radius_mm ** 2
    planted = sitk.GetImageFromArray(np.where(blob, hu, ct).astype(ct.dtype))
    planted.CopyInformation(image)
    sitk.WriteImage(planted, out_file)
    return blob, ct > -500


def test_benchmark_baselines_score_a_planted_lesion_high(pretrained_world, monkeypatch, tmp_path):
    """The non-Screener baselines of benchmarks/quality, q(HU | position) and the autoencoder's reconstruction
    error: a -500 HU sphere planted in soft tissue must raise their map there, above most of the body."""
    from nnscreener.run.pretrain import pretrain
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    images, _ = _labeled_cases(env, n=1)
    blob, body = _plant_hypodense_blob(images[0], str(tmp_path / 'planted_0000.nii.gz'))
    runs = {'intensity': ('modular', 'nnScreenerDensityTrainer_intensity'),
            'autoencoder': ('autoencoder', 'nnScreenerAutoencoderTrainer')}
    for name, (kind, trainer) in runs.items():
        pretrain(TARGET_ID, stages=['density'], device='cpu', density_trainer=trainer)
        maps = []
        for image in (images[0], str(tmp_path / 'planted_0000.nii.gz')):
            record, = predict([image], str(tmp_path / name / os.path.basename(image)), TARGET_ID, kind, 'cpu',
                              density_trainer=trainer if kind == 'modular' else None)
            maps.append(sitk.GetArrayFromImage(sitk.ReadImage(record['anomaly_map'])))
        healthy, planted = maps
        assert planted[blob].mean() > healthy[blob].mean(), name
        assert (planted[body & ~blob] < planted[blob].mean()).mean() > 0.75, name
    plans = json.load(open(join(env['nnUNet_results'], NAME, 'nnScreenerDensityTrainer_intensity__nnScreenerPlans__'
                                                               '3d_fullres', 'plans.json')))
    assert plans['screener']['descriptor'] == 'intensity' and plans['screener']['density']['model'] == \
        'conditional_histogram'
