"""Several density variants predicted at once share the descriptor and condition passes and give predict's maps."""
import glob
from os.path import basename, isfile, join

import numpy as np
import SimpleITK as sitk

from conftest import TARGET_ID

NAME = 'Dataset501_ScreenerPhantomLesions'
FLOW = 'nnScreenerDensityTrainer_flow'  # learned conditions too: both networks are shared with the default variant


def _maps(folder) -> dict:
    files = sorted(glob.glob(join(folder, '*.nii.gz')))
    return {basename(f): sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in files}


def test_variants_at_once_run_each_network_once_per_patch_and_equal_predict(pretrained_world, monkeypatch, tmp_path):
    """predict_density_variants writes every variant's folder as nnScreener_predict does (maps, scores, manifest
    listing the maps), with the same maps as predict of that variant alone; the descriptor and condition UNets ran
    once per patch batch for both variants, and the per-variant predict that writes the scores recomputed no map."""
    import nnscreener.inference.anomaly_maps as anomaly_maps
    import nnscreener.inference.variants as variants
    from nnscreener.inference.manifest import listed_maps
    from nnscreener.inference.predict import predict
    from nnscreener.run.pretrain import pretrain
    env, _ = pretrained_world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    pretrain(TARGET_ID, stages=['density'], device='cpu', density_trainer=FLOW, continue_=True)
    images = sorted(glob.glob(join(env['nnUNet_raw'], NAME, 'imagesTr', '*_0000.nii.gz')))[:2]

    network_runs, batches = {}, []  # runs of each shared network; calls of the variants' model (patch batches)
    share, call = variants.ReuseLastOutput.__init__, variants.DensityVariantsPatchModel.__call__

    def counting_init(self, network):
        share(self, network)
        network.register_forward_hook(lambda module, inputs, output: network_runs.update(
            {id(module): network_runs.get(id(module), 0) + 1}))

    def counting_call(self, *args):
        batches.append(len(args[0]))
        return call(self, *args)

    def no_second_pass(*args, **kwargs):
        raise AssertionError('predict computed a map again after the shared pass')
    monkeypatch.setattr(variants.ReuseLastOutput, '__init__', counting_init)
    monkeypatch.setattr(variants.DensityVariantsPatchModel, '__call__', counting_call)
    single_pass = anomaly_maps.body_anomaly_map
    monkeypatch.setattr(anomaly_maps, 'body_anomaly_map', no_second_pass)
    folders = {None: str(tmp_path / 'default'), FLOW: str(tmp_path / 'flow')}
    records = variants.predict_density_variants(images, folders, TARGET_ID, 'cpu')
    monkeypatch.setattr(anomaly_maps, 'body_anomaly_map', single_pass)

    assert sorted(network_runs.values()) == [len(batches)] * 2 and batches  # descriptor and condition, one pass
    for trainer, folder in folders.items():
        assert len(records[trainer]) == 2 and isfile(join(folder, 'scores.csv'))
        assert sorted(listed_maps(folder)[0].values()) == sorted(_maps(folder))
        alone = str(tmp_path / f'alone_{trainer}')
        predict(images, alone, TARGET_ID, 'modular', 'cpu', density_trainer=trainer)
        for case, anomaly_map in _maps(folder).items():
            np.testing.assert_allclose(anomaly_map, _maps(alone)[case], rtol=1e-6, atol=1e-6)
    default, flow = (_maps(f) for f in folders.values())
    assert all(not np.allclose(default[c], flow[c]) for c in default)  # two models, not one map twice
