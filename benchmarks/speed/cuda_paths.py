"""Runs every CUDA path of nnscreener once, on real code and a tiny phantom world, and says which ones work.

    python benchmarks/speed/cuda_paths.py --device cuda --out cuda_paths.json   # on a GPU (gpu_check.sh runs it)
    python benchmarks/speed/cuda_paths.py --device cpu --out /tmp/paths.json    # the same code on a CPU (dry run)

Checks, in this order; each is a row of the JSON (ok, seconds, what was seen) and a failing one does not stop the
others:
  pretrain   nnScreener_pretrain's API, all four stages (preset tiny:steps=20) on the device: bf16 autocast and
             nnU-Net's multi-process loader with pin_memory (eager, so that the quick checks below get their time)
  autocast   the dtype of the descriptor UNet's output under the stage trainers' autocast (bfloat16 on CUDA)
  pinned     whether the CUDA trainer's loader hands out pinned (page-locked) batches, which the non_blocking copy
             of train_step needs to overlap with compute
  predict    nnScreener_predict's API, modular and distilled, on the device (bf16 sliding window)
  nccl       the descriptor stage again, as rank 0 of a 1-process NCCL process group (gloo on a CPU): DDP wrapping and
             its gradient all-reduce, the way `-num_gpus N` and torchrun run each rank
  compile    the descriptor stage again with nnUNet_compile=true: torch.compile of the UNet through nnU-Net's switch
             (nnU-Net never compiles on a CPU)
"""
import argparse
import json
import os
import sys
import time
import traceback
from os.path import abspath, dirname, join

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, dirname(abspath(__file__)))
from bench_speed import machine_name, make_world, stage_trainer  # noqa: E402

PRESET = 'tiny:steps=20'


def check(results: dict, name: str, fn, out: str) -> None:
    """Runs fn, records {ok, seconds, **fn's result} or the error under `name`, rewrites `out`."""
    results[name] = {'ok': None, 'status': 'started'}  # what a timeout leaves: the check that was running
    _write(results, out)
    t0 = time.time()
    try:
        results[name] = {'ok': True, **(fn() or {})}
    except Exception as e:  # a check reports its failure; the next one still runs
        traceback.print_exc()
        results[name] = {'ok': False, 'error': f'{type(e).__name__}: {e}'[:600]}
    results[name]['seconds'] = time.time() - t0
    print(f'{name}: {"ok" if results[name]["ok"] else "FAILED"} ({results[name]["seconds"]:.0f} s)', flush=True)
    _write(results, out)


def _write(results: dict, out: str) -> None:
    with open(out, 'w') as f:
        json.dump(results, f, indent=2)


def pretrain_all(dataset: str, device: str) -> dict:
    from nnscreener.run.pretrain import pretrain
    checkpoints = pretrain(dataset, device=device)
    return {'stages_written': sorted(stage for stage, f in checkpoints.items() if os.path.isfile(f))}


def compiled_descriptor(dataset: str, device: str) -> dict:
    from nnscreener.run.pretrain import pretrain
    os.environ['nnUNet_compile'] = 'true'
    try:
        pretrain(dataset, stages=['descriptor'], device=device)
    finally:
        os.environ['nnUNet_compile'] = 'false'
    return {'compiled': _log_says_compiled(dataset, 'descriptor')}


def _log_says_compiled(dataset: str, stage: str) -> bool:
    """Whether one of the stage's nnU-Net training logs says its network was compiled."""
    from nnscreener.training.stages import stage_folder
    folder = stage_folder(dataset, stage)
    return any('Using torch.compile on the network' in open(join(folder, f)).read() for f in os.listdir(folder)
               if f.startswith('training_log'))


def autocast_dtype(dataset: str, device: torch.device) -> dict:
    trainer = stage_trainer(dataset, 'descriptor', device)
    x = torch.rand((2, 1, *trainer.configuration_manager.patch_size), device=device)
    with torch.no_grad(), trainer.autocast():
        dtype = trainer.objective.network(x).dtype
    return {'output_dtype': str(dtype), 'bf16': dtype == torch.bfloat16}


def pinned_batches(dataset: str, device: torch.device) -> dict:
    from nnscreener.training.stage_trainer import shutdown_loader
    trainer = stage_trainer(dataset, 'descriptor', device)
    loader = trainer.build_loader(seed=0)
    batch = next(loader)
    shutdown_loader(loader)
    kinds = {k: type(v).__name__ for k, v in batch.items()}
    pinned = {k: bool(v.is_pinned()) if torch.is_tensor(v) else False for k, v in batch.items()}
    return {'types': kinds, 'pinned': pinned, 'all_pinned': all(pinned.values())}


def predict_both(dataset: str, images: str, work: str, device: str) -> dict:
    from nnscreener.inference.predict import predict
    result = {}
    for kind in ('modular', 'distilled'):
        records = predict(images, join(work, f'maps_{kind}'), dataset, kind, device)
        result[kind] = {'maps': len(records), 'finite': bool(np.all(np.isfinite([r['map_max'] for r in records])))}
    return result


def nccl_stage(dataset: str, work: str, device: str) -> dict:
    """The descriptor stage in a 1-process group: nnU-Net's trainer sees an initialised group and wraps DDP."""
    from nnscreener.run.pretrain import pretrain, pretrain_log_file
    backend = 'nccl' if device == 'cuda' else 'gloo'
    dist.init_process_group(backend, init_method=f'file://{join(work, "rendezvous")}', rank=0, world_size=1)
    try:
        checkpoint = pretrain(dataset, stages=['descriptor'], device=device)['descriptor']
        with open(pretrain_log_file(dataset)) as log:  # nnU-Net's trainer says so when it joins a process group
            joined = 'The world size is 1' in log.read()
        return {'backend': dist.get_backend(), 'world_size': dist.get_world_size(), 'trainer_joined_group': joined,
                'checkpoint_written': os.path.isfile(checkpoint)}
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--work', default='/tmp/nnscreener_cuda_paths')
    parser.add_argument('--out', default='cuda_paths.json')
    args = parser.parse_args()
    os.environ['nnUNet_compile'] = 'false'  # the compile check alone turns it on
    device = torch.device(args.device)
    results = {'device': machine_name(device), 'torch': torch.__version__, 'preset': PRESET,
               'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
    dataset = make_world(join(args.work, 'world'), PRESET)
    images = join(os.environ['nnUNet_raw'], dataset, 'imagesTr')
    check(results, 'pretrain', lambda: pretrain_all(dataset, args.device), args.out)
    check(results, 'autocast', lambda: autocast_dtype(dataset, device), args.out)
    check(results, 'pinned', lambda: pinned_batches(dataset, device), args.out)
    check(results, 'predict', lambda: predict_both(dataset, images, args.work, args.device), args.out)
    check(results, 'nccl', lambda: nccl_stage(dataset, args.work, args.device), args.out)
    check(results, 'compile', lambda: compiled_descriptor(dataset, args.device), args.out)
    return 0 if all(r['ok'] for r in results.values() if isinstance(r, dict)) else 1


if __name__ == '__main__':
    sys.exit(main())
