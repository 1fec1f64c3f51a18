"""Speed of every Screener stage next to the hardware limit of the plans' UNet, in one run on one device.

    python benchmarks/speed/bench_speed.py --preset default --device cuda      # the paper's scale, GPU
    python benchmarks/speed/bench_speed.py --preset tiny --device cpu --ct_shape 96 192 192

It builds a small phantom world in a temp folder (plans of the chosen preset), then times:
  limit      bare plans-UNet forward+backward (and forward only) on random tensors at the SSL batch (2 m crops)
  loader     the SSL crop-pair loader alone (nnU-Net's multi-process augmenter)
  ssl        real descriptor training steps (loader + jitter + UNet fwd/bwd of both views + VICReg + AdamW)
  density    real density steps (frozen descriptor + condition, pooled features, conditional Gaussian)
  distill    real distillation steps (teacher = modular Screener, student = plans UNet)
  inference  one synthetic chest CT (--ct_shape, 0.7 x 0.7 x 1 mm): networks alone and end to end (read,
             preprocess, CLAHE, sliding window, resample back, write), modular and distilled; peak GPU memory
Results print as a table and go to --out (JSON). Ratios are relative to the limit measured in the same run.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from os.path import join

import numpy as np
import SimpleITK as sitk
import torch

from nnscreener.training.stage_trainer import shutdown_loader


def timed(fn, n: int, warmup: int = 2, device=None) -> float:
    """Seconds per call of fn, after warm-up (compile, cudnn autotune)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _sync(device):
    if device is not None and device.type == 'cuda':
        torch.cuda.synchronize()


def make_world(root: str, preset: str) -> None:
    for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[k] = join(root, k)
        os.makedirs(os.environ[k], exist_ok=True)
    from nnscreener.phantoms.make_phantoms import make_phantom_datasets
    from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
    phantoms = 'default' if preset == 'default' else 'tiny'  # CPU presets plan tiny phantoms (the benchmarks' world)
    make_phantom_datasets(501, None, num_labeled=4, preset=phantoms, seed=0, num_processes=2)
    plan_and_preprocess(501, preset=preset, num_processes=2)


def get_trainer(name: str, device, num_steps: int):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args('501', '3d_fullres', 'all', name, 'nnScreenerPlans', False, device=device)
    trainer.num_steps = num_steps
    trainer.initialize()
    return trainer


def bench_limit(trainer, device) -> dict:
    m = trainer.hparams['batch_size']
    network = trainer.objective.network
    x = torch.rand((2 * m, 1, *trainer.configuration_manager.patch_size), device=device)

    def fwd_bwd():
        with trainer.autocast():
            out = network(x)
        out.float().square().mean().backward()

    def fwd():
        with torch.no_grad(), trainer.autocast():
            network(x)
    return {'limit_fwd_bwd_steps_per_s': 1 / timed(fwd_bwd, 10, device=device),
            'limit_fwd_steps_per_s': 1 / timed(fwd, 10, device=device)}


def bench_stage(trainer, n: int, device) -> float:
    loader = trainer.build_loader(seed=0)
    sec = timed(lambda: trainer.train_step(next(loader)), n, device=device)
    shutdown_loader(loader)
    return 1 / sec


def bench_loader(trainer, n: int) -> float:
    loader = trainer.build_loader(seed=0)
    sec = timed(lambda: next(loader), n)
    shutdown_loader(loader)
    return 1 / sec


def finish_stage(trainer) -> None:
    """Writes a checkpoint_final so the next stage can load this one (weights barely trained: speed only)."""
    trainer.current_step = trainer.num_steps
    trainer.save_checkpoint(join(trainer.output_folder, 'checkpoint_final.pth'))
    trainer.save_plans_and_dataset_json()


def synthetic_ct(path: str, shape_zyx) -> None:
    z, y, x = np.ogrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    body = ((y - shape_zyx[1] / 2) / (shape_zyx[1] * 0.42)) ** 2 + ((x - shape_zyx[2] / 2) / (shape_zyx[2] * 0.35)) ** 2 < 1
    lungs = body & ((((y - shape_zyx[1] * 0.45) / (shape_zyx[1] * 0.2)) ** 2 +
                     ((np.abs(x - shape_zyx[2] / 2) - shape_zyx[2] * 0.15) / (shape_zyx[2] * 0.12)) ** 2) < 1)
    hu = np.where(body, 40, -1000) + 0 * z
    hu = np.where(lungs, -850, hu) + np.random.default_rng(0).normal(0, 15, shape_zyx)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((0.7, 0.7, 1.0))
    sitk.WriteImage(image, path)


def bench_inference(kind: str, ct_file: str, out: str, device) -> dict:
    from nnscreener.inference.anomaly_maps import body_anomaly_map, preprocess_for_screener
    from nnscreener.inference.predict import load_patch_model, predict
    model, plans_manager, dataset_json = load_patch_model('Dataset501_ScreenerPhantomLesions', kind, device)
    config = plans_manager.get_configuration('3d_fullres')
    stock, view, _ = preprocess_for_screener(ct_file, plans_manager, config, dataset_json)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    networks = timed(lambda: body_anomaly_map(stock, view, model), 3, warmup=1, device=device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else float('nan')
    end_to_end = timed(lambda: predict(ct_file, out, 501, kind, device.type), 1, warmup=1, device=device)
    return {f'{kind}_networks_s': networks, f'{kind}_end_to_end_s': end_to_end, f'{kind}_peak_gpu_gib': peak,
            'preprocessed_shape': list(stock.shape)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', default='default')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--steps', type=int, default=20, help='timed steps per stage')
    parser.add_argument('--ct_shape', type=int, nargs=3, default=[300, 512, 512], help='(z, y, x) of the test CT')
    parser.add_argument('--out', default='benchmark_speed.json')
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {'device': torch.cuda.get_device_name() if device.type == 'cuda' else f'cpu x{torch.get_num_threads()}',
               'preset': args.preset, 'torch': torch.__version__,
               'compile': os.environ.get('nnUNet_compile', 'default (on for CUDA)')}
    with tempfile.TemporaryDirectory() as root:
        make_world(root, args.preset)
        descriptor = get_trainer('nnScreenerDescriptorTrainer', device, args.steps)
        results.update(bench_limit(descriptor, device))
        results['loader_batches_per_s'] = bench_loader(descriptor, args.steps)
        results['ssl_steps_per_s'] = bench_stage(descriptor, args.steps, device)
        finish_stage(descriptor)
        condition = get_trainer('nnScreenerConditionTrainer', device, args.steps)
        finish_stage(condition)
        density = get_trainer('nnScreenerDensityTrainer', device, args.steps)
        results['density_steps_per_s'] = bench_stage(density, args.steps, device)
        finish_stage(density)
        distillation = get_trainer('nnScreenerDistillationTrainer', device, args.steps)
        results['distillation_steps_per_s'] = bench_stage(distillation, args.steps, device)
        finish_stage(distillation)
        ct_file = join(root, 'chest_ct.nii.gz')
        synthetic_ct(ct_file, args.ct_shape)
        for kind in ('modular', 'distilled'):
            results.update(bench_inference(kind, ct_file, join(root, f'maps_{kind}'), device))
    results['ssl_fraction_of_limit'] = results['ssl_steps_per_s'] / results['limit_fwd_bwd_steps_per_s']
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=2)
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f'{k:<{width}}  {v:.3f}' if isinstance(v, float) else f'{k:<{width}}  {v}')


if __name__ == '__main__':
    sys.exit(main())
