"""Speed of every Screener stage against the bare plans UNet and against stock nnU-Net, in one run on one device.

    # the paper's scale on one GPU (benchmarks/speed/gpu_check.sh runs this on a lent machine)
    python benchmarks/speed/bench_speed.py --preset default --device cuda --network_time \\
        --out benchmarks/results/speed_gpu.json
    # the paper's scale on a 2-core CPU: one timed step per stage, 2 crops per network call, no window overlap
    nice python benchmarks/speed/bench_speed.py --preset default --device cpu --steps 1 --max_batch 2 \\
        --step_size 1 --shared_cores --out benchmarks/results/speed_cpu.json

World: an image-only dataset of every CT in --realct (default ../shared/realct), planned and preprocessed at
--preset; without that folder, phantoms. Then, in this order:
  loader     the SSL crop-pair loader on that world: crop pairs per second in one process (= per worker), and
             batches per second through nnU-Net's multi-process augmenter
  stages     descriptor, condition (block masking), density, distillation: the stage's networks alone on random
             crops at its batch (SSL: the plans UNet forward+backward; density: frozen descriptor + condition forward;
             distillation: those and the student's forward+backward), then its real steps (loader, jitter, masking,
             the 8192-wide expander and VICReg, pooled conditional Gaussian, teacher maps, AdamW...); the descriptor
             step is split into where its time goes: waiting for the loader, the UNet, the expander + VICReg,
             gradient clipping + AdamW (each timed alone at the same batch) and the rest (jitter, feature sampling)
  inference  whole-CT maps of a real CT (--real_ct) and a synthetic 512 x 512 x 300 chest CT (--ct_shape), each
             a command of its own: nnScreener_predict distilled and modular, and stock nnU-Net
             (nnUNetv2_predict_from_modelfolder) of the distilled UNet's plans and checkpoint, same step size, no
             mirroring; wall time and peak RAM (the process tree's resident memory) of each
The stage checkpoints hold the weights of those few steps, saved in the stages' real format: right for speed, not
for maps. --max_batch caps the crops of a network call (the SSL batch m to half of it, pairs per CT kept) where the
paper's batches do not fit a CPU's memory or time. Every ratio is between numbers of this run. Results print as a
table and go to --out (JSON).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from os.path import abspath, dirname, isdir, isfile, join

import numpy as np
import SimpleITK as sitk
import torch

REPO = dirname(dirname(dirname(abspath(__file__))))
DEFAULT_REALCT = join(dirname(REPO), 'shared', 'realct')
REAL_CT = 'CRLM-CT-1006_ct_nomask.nii.gz'  # the largest real abdomen CT there: 512 x 512 x 51, 0.8 x 0.8 x 5 mm
REALCT_ID, PHANTOM_ID = 512, 501
PLANS, CONFIGURATION, FOLD = 'nnScreenerPlans', '3d_fullres', 'all'
NNUNET_ENV = ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')
STAGES = {'descriptor': 'nnScreenerDescriptorTrainer', 'condition': 'nnScreenerConditionTrainer',
          'density': 'nnScreenerDensityTrainer', 'distillation': 'nnScreenerDistillationTrainer'}
OUR_PREDICT = 'from nnscreener.inference.predict import predict_entry; predict_entry()'
# the function of stock nnU-Net's console script nnUNetv2_predict_from_modelfolder
STOCK_PREDICT = ('from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder as p; p()')
GIB = 2 ** 30
# issue 14's targets; the GPU ones apply to a GPU run only
CPU_TARGETS = {'ssl_step_vs_bare': 0.65, 'loader_crops_per_s_per_worker': 10.0, 'distilled_vs_nnunet_predict': 1.2,
               'modular_vs_distilled': 2.5, 'peak_rss_gb_512x512x300': 8.0}
GPU_TARGETS = {'ssl_steps_per_s': 5.0, 'density_steps_per_s': 10.0, 'modular_network_s': 1.0,
               'distilled_network_s': 0.25}


def timed(fn, n: int, warmup: int, device) -> float:
    """Seconds per call of fn, after warm-up calls (compile, cudnn autotune, first allocations)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


# ---------------------------------------------------------------- world
def make_world(root: str, preset: str, realct: str = None) -> str:
    """nnU-Net folders under root holding one dataset planned at `preset`; returns its name. An existing world
    (--work) is kept."""
    for k in NNUNET_ENV:
        os.environ[k] = join(root, k)
        os.makedirs(os.environ[k], exist_ok=True)
    from nnscreener.preprocessing.plan_and_preprocess import plan_and_preprocess
    from nnscreener.utilities.paths import dataset_name
    if realct:
        realct_dataset(realct, join(os.environ['nnUNet_raw'], f'Dataset{REALCT_ID}_RealCTSpeed'))
        # real scans shorter than the default patch (e.g. 30 slices of 3 mm) are zero-padded, as nnU-Net does
        plan_and_preprocess(REALCT_ID, preset=preset, num_processes=2, allow_small_images=True, continue_=True)
        return str(dataset_name(REALCT_ID))  # nnU-Net's is a numpy string
    from nnscreener.phantoms.make_phantoms import make_phantom_datasets
    if not any(d.startswith(f'Dataset{PHANTOM_ID}_') for d in os.listdir(os.environ['nnUNet_raw'])):
        phantoms = 'default' if preset == 'default' else 'tiny'  # CPU presets plan tiny phantoms
        make_phantom_datasets(PHANTOM_ID, None, num_labeled=4, preset=phantoms, seed=0,
                              num_processes=min(8, os.cpu_count()))
    plan_and_preprocess(PHANTOM_ID, preset=preset, num_processes=min(8, os.cpu_count()), continue_=True)
    return str(dataset_name(PHANTOM_ID))


def realct_dataset(realct: str, folder: str) -> None:
    """An image-only raw dataset of every CT in `realct` (files with '_ct' in their name), linked, never copied."""
    if isdir(folder):
        return
    cts = sorted(f for f in os.listdir(realct) if '_ct' in f and f.endswith('.nii.gz'))
    os.makedirs(join(folder, 'imagesTr'))
    for f in cts:
        os.symlink(join(abspath(realct), f), join(folder, 'imagesTr', f[:-len('.nii.gz')] + '_0000.nii.gz'))
    with open(join(folder, 'dataset.json'), 'w') as f:
        json.dump({'channel_names': {'0': 'CT'}, 'labels': {'background': 0}, 'numTraining': len(cts),
                   'file_ending': '.nii.gz', 'name': os.path.basename(folder)}, f, indent=1)


# ---------------------------------------------------------------- training stages
def stage_trainer(dataset: str, stage: str, device, max_batch: int = None):
    """The stage's real trainer, initialised, its batch capped to `max_batch` crops per network call."""
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(dataset, CONFIGURATION, FOLD, STAGES[stage], PLANS, False, device=device)
    if max_batch:
        trainer.settings = trainer.settings.with_stage(trainer.settings_block,
                                                       **capped_batch(trainer.stage_settings, trainer.settings_block,
                                                                      max_batch))
        trainer.stage_settings = trainer.settings.stage(trainer.settings_block)
    if stage == 'distillation':  # its target calibration runs the teacher on 64 crops: one batch is enough here
        import nnscreener.trainers.nnscreener_distillation_trainer as distillation
        distillation.CALIBRATION_CROPS = trainer.stage_settings.batch_size
    trainer.initialize()
    return trainer


def capped_batch(hp, block: str, max_batch: int) -> dict:
    """The changed settings of stage block `hp`. SSL: m CTs make 2 m crops; the positive pairs per CT stay the
    paper's (N / m)."""
    if block == 'ssl':
        batch_size = min(hp.batch_size, max(1, max_batch // 2))
        return {'batch_size': batch_size, 'positive_pairs': hp.positive_pairs // hp.batch_size * batch_size}
    return {'batch_size': min(hp.batch_size, max_batch)}


def crops_per_call(trainer) -> int:
    m = trainer.per_rank_batch_size(trainer.stage_settings.batch_size)
    return 2 * m if trainer.settings_block == 'ssl' else m


def unet_seconds(network, batch: int, patch, autocast, backward: bool, n: int, warmup: int, device) -> float:
    """Seconds of one network call on `batch` random crops: forward+backward of a dummy loss, or forward only."""
    x = torch.rand((batch, 1, *patch), device=device)

    def call():
        with torch.set_grad_enabled(backward), autocast():
            out = network(x)
        if backward:
            out.float().square().mean().backward()
    return timed(call, n, warmup, device)


def bare_work(trainer, n: int, warmup: int, device) -> dict:
    """Seconds of the stage's networks alone at its batch, as its step runs them: SSL the UNet forward+backward;
    density the frozen descriptor (+ condition) forward; distillation those and the student's forward+backward."""
    batch, patch = crops_per_call(trainer), trainer.configuration_manager.patch_size
    objective = trainer.objective
    run = {}
    if trainer.settings_block == 'ssl':
        run['unet_fwd_bwd'] = (objective.network, True)
    else:
        screener = objective.screener if trainer.settings_block == 'density' else objective.teacher
        run['descriptor_fwd'] = (screener.descriptor, False)
        if screener.condition is not None:
            run['condition_fwd'] = (screener.condition, False)
        if trainer.settings_block == 'distillation':
            run['student_fwd_bwd'] = (objective.network, True)
    return {k: unet_seconds(net, batch, patch, trainer.autocast, grad, n, warmup, device)
            for k, (net, grad) in run.items()}


def stage_steps(trainer, n: int, warmup: int, device) -> dict:
    """Real training steps: mean seconds waiting for the loader's next batch and computing the step."""
    from nnscreener.training.stage_trainer import shutdown_loader
    loader = trainer.build_loader(seed=0)
    next(loader)  # the workers' start is no step's wait
    waits, computes = [], []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        trainer.train_step(batch)  # its loss.item() waits for the device
        if i >= warmup:
            waits.append(t1 - t0)
            computes.append(time.perf_counter() - t1)
    shutdown_loader(loader)
    wait, compute = float(np.mean(waits)), float(np.mean(computes))
    return {'batch': crops_per_call(trainer), 'step_s': wait + compute, 'steps_per_s': 1 / (wait + compute),
            'loader_wait_s': wait}


def ssl_profile(trainer, step: dict, unet_s: float, n: int, warmup: int, device) -> dict:
    """Where an SSL step's time goes: its parts timed alone at the same batch; the rest is jitter, masking and
    feature sampling (and what the parts' separate timing misses)."""
    m = trainer.per_rank_batch_size(trainer.stage_settings.batch_size)
    pairs = trainer.stage_settings.positive_pairs // trainer.stage_settings.batch_size
    dim = getattr(trainer.settings, trainer.feature_dim_key)
    y1, y2 = (torch.randn(m, pairs, dim, device=device, requires_grad=True) for _ in range(2))

    def loss_fwd_bwd():
        with trainer.autocast():
            loss, _ = trainer.objective.loss(y1, y2)
        loss.backward()

    def optimizer_step():  # on the gradients the timed steps left
        torch.nn.utils.clip_grad_norm_(trainer.objective.parameters(), trainer.stage_settings.grad_clip)
        trainer.optimizer.step()
    parts = {'loader_wait': step['loader_wait_s'], 'unet_fwd_bwd': unet_s,
             'expander_and_vicreg_fwd_bwd': timed(loss_fwd_bwd, n, warmup, device),
             'clip_and_adamw': timed(optimizer_step, n, warmup, device)}
    parts['rest'] = step['step_s'] - sum(parts.values())
    patch = trainer.configuration_manager.patch_size
    flops = {'unet_fwd_bwd': fwd_bwd_flops(trainer.objective.network, [(2 * m, 1, *patch)], False),
             'expander_and_vicreg_fwd_bwd': fwd_bwd_flops(trainer.objective.loss, [(m, pairs, dim)] * 2, True)}
    return {'positive_pairs': m * pairs, 'expander_dims': list(trainer.stage_settings.expander_dims),
            'tflop': {k: v / 1e12 for k, v in flops.items()},
            'parameters_millions': {'unet': _millions(trainer.objective.network),
                                    'expander': _millions(trainer.objective.loss)},
            'seconds': parts, 'share_of_step': {k: v / step['step_s'] for k, v in parts.items()}}


def fwd_bwd_flops(module, input_shapes, inputs_need_grad: bool) -> float:
    """Floating-point operations of forward+backward (of the output's sum), counted by torch on a copy on the meta
    device: shapes only, nothing is computed. inputs_need_grad: as in the step (descriptors do, images do not)."""
    from torch.utils.flop_counter import FlopCounterMode
    copy = deepcopy(getattr(module, '_orig_mod', module)).to('meta')  # a compiled network's own module
    inputs = [torch.rand(s, device='meta', requires_grad=inputs_need_grad) for s in input_shapes]
    with FlopCounterMode(display=False) as counter:
        out = copy(*inputs)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return float(counter.get_total_flops())


def _millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def loader_rates(trainer, n: int) -> dict:
    """Crop pairs per second of the SSL loader in this process (what one worker makes; 8 or more pairs timed) and
    batches per second of the multi-process loader the trainer uses (nnUNet_n_proc_DA workers; n batches)."""
    from nnscreener.training.stage_trainer import shutdown_loader
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    m = trainer.per_rank_batch_size(trainer.stage_settings.batch_size)
    saved = os.environ.get('nnUNet_n_proc_DA')
    os.environ['nnUNet_n_proc_DA'] = '0'  # nnU-Net's single-threaded augmenter: generate_train_batch in-process
    try:
        one = trainer.build_loader(seed=0)
    finally:
        _restore_env('nnUNet_n_proc_DA', saved)
    per_worker = m / timed(lambda: next(one), max(2, -(-8 // m)), 1, torch.device('cpu'))
    workers = trainer.build_loader(seed=0)
    batches = 1 / timed(lambda: next(workers), max(4, n), 2, torch.device('cpu'))
    shutdown_loader(workers)
    return {'crop_pairs_per_s_one_process': per_worker, 'pairs_per_ct': trainer.stage_settings.positive_pairs //
            trainer.stage_settings.batch_size, 'multiprocess_batches_per_s': batches, 'batch_m': m,
            'workers': get_allowed_n_proc_DA()}


def _restore_env(key: str, value) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def finish_stage(trainer) -> None:
    """Writes the stage's checkpoint_final in its real format so later stages and predict load it."""
    trainer.save_checkpoint(join(trainer.output_folder, 'checkpoint_final.pth'))
    trainer.save_plans_and_dataset_json()


def bench_training(dataset: str, args, device) -> dict:
    """loader, then per stage its networks alone (right before its steps) and its real steps; the descriptor's step
    split into its parts. Leaves every stage's checkpoint."""
    out, n, w = {}, args.steps, args.warmup
    for stage in STAGES:
        trainer = stage_trainer(dataset, stage, device, args.max_batch)
        if stage == 'descriptor':
            out['loader'] = loader_rates(trainer, n)
        # the condition UNet is the descriptor's architecture at the same batch: its bare time is the descriptor's
        bare = out['descriptor']['bare_s'] if stage == 'condition' else bare_work(trainer, n, w, device)
        step = stage_steps(trainer, n, w, device)
        out[stage] = {**step, 'bare_s': bare, 'vs_bare': sum(bare.values()) / step['step_s']}
        if stage == 'descriptor':
            out[stage]['profile'] = ssl_profile(trainer, step, bare['unet_fwd_bwd'], n, w, device)
        finish_stage(trainer)
        del trainer
    return out


# ---------------------------------------------------------------- whole-CT inference
def synthetic_ct(path: str, shape_zyx) -> None:
    """A chest-like int16 CT at 0.7 x 0.7 x 1 mm: an elliptic body at 40 HU with two lungs at -850 HU, noise sd 15."""
    z, y, x = np.ogrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    body = (((y - shape_zyx[1] / 2) / (shape_zyx[1] * 0.42)) ** 2 +
            ((x - shape_zyx[2] / 2) / (shape_zyx[2] * 0.35)) ** 2) < 1
    lungs = body & ((((y - shape_zyx[1] * 0.45) / (shape_zyx[1] * 0.2)) ** 2 +
                     ((np.abs(x - shape_zyx[2] / 2) - shape_zyx[2] * 0.15) / (shape_zyx[2] * 0.12)) ** 2) < 1)
    hu = np.where(body, 40, -1000) + 0 * z
    hu = np.where(lungs, -850, hu) + np.random.default_rng(0).normal(0, 15, shape_zyx)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((0.7, 0.7, 1.0))
    sitk.WriteImage(image, path)


def stock_model_folder(dataset: str, folder: str) -> str:
    """A model folder stock nnU-Net predicts with: the distilled UNet's plans.json and checkpoint_final.pth (nnU-Net's
    checkpoint format; its trainer's network builder is nnU-Net's own) and a dataset.json whose only label is the
    background, so that nnU-Net builds the UNet with the student's single output channel."""
    from nnscreener.training.stages import stage_checkpoint, stage_folder
    source = dirname(stage_folder(dataset, 'distillation'))
    os.makedirs(join(folder, f'fold_{FOLD}'), exist_ok=True)
    shutil.copy(join(source, 'plans.json'), join(folder, 'plans.json'))
    with open(join(source, 'dataset.json')) as f:
        dataset_json = {**json.load(f), 'labels': {'background': 0}}
    with open(join(folder, 'dataset.json'), 'w') as f:
        json.dump(dataset_json, f, indent=1)
    link = join(folder, f'fold_{FOLD}', 'checkpoint_final.pth')
    if not os.path.lexists(link):
        os.symlink(stage_checkpoint(dataset, 'distillation'), link)
    return folder


def tree_memory(root: int) -> tuple:
    """(RSS, PSS) bytes of a process and all its descendants, from /proc. PSS shares each page among the processes
    mapping it, so a tree of processes importing the same libraries (stock nnU-Net's workers) is not counted twice."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    children.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(int(entry))
            except OSError:  # ended meanwhile
                continue
    total, todo = np.zeros(2), [root]
    while todo:
        pid = todo.pop()
        total += _rss_and_pss(pid)
        todo += children.get(pid, [])
    return tuple(total)


def _rss_and_pss(pid: int) -> np.ndarray:
    try:
        with open(f'/proc/{pid}/smaps_rollup') as f:
            fields = dict(line.split(':', 1) for line in f if line.startswith(('Rss:', 'Pss:')))
    except OSError:
        return np.zeros(2)
    return np.array([int(fields.get(k, '0 kB').split()[0]) * 1024 for k in ('Rss', 'Pss')], dtype=np.float64)


def run_measured(cmd: list, env: dict, log_file: str) -> dict:
    """Wall seconds and peak RAM of a command: its process tree's summed resident memory (RSS, and PSS), sampled
    every 0.2 s."""
    t0 = time.perf_counter()
    peak = np.zeros(2)
    with open(log_file, 'w') as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            peak = np.maximum(peak, tree_memory(process.pid))
            time.sleep(0.2)
    if process.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd[:3])} ... failed with exit code {process.returncode}: see {log_file}')
    return {'wall_s': time.perf_counter() - t0, 'peak_rss_gb': float(peak[0] / GIB),
            'peak_pss_gb': float(peak[1] / GIB)}


def predict_commands(dataset: str, ct_file: str, work: str, tag: str, stock_model: str, args) -> dict:
    """The three commands on one CT, each writing into a fresh folder of its own."""
    case_folder = join(work, f'stock_input_{tag}')  # nnU-Net reads <case>_0000.nii.gz from a folder
    os.makedirs(case_folder, exist_ok=True)
    if not os.path.lexists(join(case_folder, f'{tag}_0000.nii.gz')):
        os.symlink(abspath(ct_file), join(case_folder, f'{tag}_0000.nii.gz'))
    ours = [sys.executable, '-c', OUR_PREDICT, '-i', ct_file, '-d', dataset, '-device', args.device,
            '--step_size', str(args.step_size)]
    return {'nnunet': [sys.executable, '-c', STOCK_PREDICT, '-i', case_folder, '-o', join(work, f'nnunet_{tag}'),
                       '-m', stock_model, '-f', FOLD, '-step_size', str(args.step_size), '--disable_tta',
                       '-device', args.device, '-npp', '1', '-nps', '1', '--disable_progress_bar'],
            'distilled': ours + ['--model', 'distilled', '-o', join(work, f'distilled_{tag}')],
            'modular': ours + ['--model', 'modular', '-o', join(work, f'modular_{tag}')]}


def bench_whole_ct(dataset: str, ct_file: str, work: str, tag: str, stock_model: str, args, result: dict,
                   saved) -> None:
    """The three predict commands on one CT, one after another, each timed as a whole, into `result`; `saved` is
    called after each (a run cut short keeps the arms it finished)."""
    # the same torch threads for every arm: stock nnU-Net sets them to the CPU count on a CPU
    threads = os.cpu_count() if args.device == 'cpu' else 1
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'nnUNet_compile': 'false'}
    result.update(ct=abspath(ct_file), size_xyz=list(sitk.ReadImage(ct_file).GetSize()), torch_threads=threads)
    for arm, cmd in predict_commands(dataset, ct_file, work, tag, stock_model, args).items():
        shutil.rmtree(cmd[cmd.index('-o') + 1], ignore_errors=True)
        print(f'inference {tag}: {arm} ...', flush=True)
        result[arm] = run_measured(cmd, env, join(work, f'{arm}_{tag}.log'))
        saved()


def network_times(dataset: str, ct_file: str, args, device) -> dict:
    """Seconds of the networks alone on the preprocessed CT (sliding window over the body box), in this process."""
    from nnscreener.inference.anomaly_maps import body_anomaly_map, preprocess_for_screener
    from nnscreener.inference.trained_model import load_trained_model
    models = {kind: load_trained_model(dataset, kind, device) for kind in ('modular', 'distilled')}
    modular = models['modular']  # one plans for both models
    stock, view, _ = preprocess_for_screener(ct_file, modular.plans_manager, modular.configuration_manager,
                                             modular.dataset_json)
    result = {'preprocessed_shape': list(stock.shape), 'body_box_shape': list(stock[view.slicer].shape)}
    for kind, model in ((kind, trained.patch_model) for kind, trained in models.items()):
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        result[f'{kind}_network_s'] = timed(lambda: body_anomaly_map(stock, view, model, args.step_size), 3, 1,
                                            device)
        if device.type == 'cuda':
            result[f'{kind}_peak_gpu_gib'] = torch.cuda.max_memory_allocated() / GIB
    return result


def bench_inference(dataset: str, work: str, args, device, saved) -> dict:
    """{CT tag: its predict commands' results}, filled in place; `saved(inference)` after each measurement."""
    stock_model = stock_model_folder(dataset, join(work, 'stock_nnunet_model'))
    synthetic = join(work, 'synthetic_{}x{}x{}.nii.gz'.format(*args.ct_shape[::-1]))
    if not isfile(synthetic):
        synthetic_ct(synthetic, args.ct_shape)
    cts = {'real': args.real_ct, 'synthetic': synthetic} if args.real_ct else {'synthetic': synthetic}
    out = {}
    for tag, ct in cts.items():
        bench_whole_ct(dataset, ct, work, tag, stock_model, args, out.setdefault(tag, {}), lambda: saved(out))
    if args.network_time:
        out['synthetic']['networks'] = network_times(dataset, synthetic, args, device)
        saved(out)
    return out


# ---------------------------------------------------------------- report
def summary(training: dict, inference: dict, device) -> dict:
    """The issue's keys; ratios of this run."""
    result = {'ssl_step_vs_bare': {s: training[s]['vs_bare'] for s in ('descriptor', 'condition')},
              'density_step_vs_bare': training['density']['vs_bare'],
              'distillation_step_vs_bare': training['distillation']['vs_bare'],
              'loader_crops_per_s_per_worker': training['loader']['crop_pairs_per_s_one_process']}
    for key, (arm, reference) in (('distilled_vs_nnunet_predict', ('distilled', 'nnunet')),
                                  ('modular_vs_distilled', ('modular', 'distilled'))):
        ratios = {t: r[arm]['wall_s'] / r[reference]['wall_s'] for t, r in inference.items() if arm in r and
                  reference in r}
        if ratios:
            result[key] = ratios
    synthetic = inference.get('synthetic', {})
    if all(arm in synthetic for arm in ('distilled', 'modular', 'nnunet')):
        result['peak_rss_gb_512x512x300'] = {arm: synthetic[arm]['peak_rss_gb'] for arm in ('distilled', 'modular',
                                                                                           'nnunet')}
    if device.type == 'cuda':
        result.update(ssl_steps_per_s=training['descriptor']['steps_per_s'],
                      density_steps_per_s=training['density']['steps_per_s'])
        result.update({k: v for k, v in inference.get('synthetic', {}).get('networks', {}).items()
                       if k.endswith('_network_s')})
    return result


def targets(result: dict, device) -> list:
    """[name, measured (worst case), target, met] per target that this run measured."""
    def worst(key, high_is_good):
        value = result[key]
        values = list(value.values()) if isinstance(value, dict) else [value]
        return min(values) if high_is_good else max(values)
    checks = [('ssl_step_vs_bare', True), ('loader_crops_per_s_per_worker', True),
              ('distilled_vs_nnunet_predict', False), ('modular_vs_distilled', False)]
    rows = [[k, worst(k, good), CPU_TARGETS[k], bool(worst(k, good) >= CPU_TARGETS[k]) == good]
            for k, good in checks if k in result]
    if 'peak_rss_gb_512x512x300' in result:  # ours; stock nnU-Net's is beside it for reference
        ours = max(result['peak_rss_gb_512x512x300'][a] for a in ('distilled', 'modular'))
        rows.append(['peak_rss_gb_512x512x300', ours, CPU_TARGETS['peak_rss_gb_512x512x300'],
                     bool(ours <= CPU_TARGETS['peak_rss_gb_512x512x300'])])
    if device.type == 'cuda':
        rows += [[k, result[k], t, bool(result[k] >= t if k.endswith('per_s') else result[k] <= t)]
                 for k, t in GPU_TARGETS.items() if k in result]
    return rows


def machine_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU ({os.cpu_count()} cores)'


def machine(args, device) -> dict:
    return {'device': machine_name(device), 'torch': torch.__version__, 'command': ' '.join(['python'] + sys.argv),
            'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'threads': {'training_torch_threads': torch.get_num_threads(),
                        'nnUNet_n_proc_DA': os.environ.get('nnUNet_n_proc_DA', "nnU-Net's default")},
            'cores_shared': args.shared_cores,
            'compile': os.environ.get('nnUNet_compile', "nnU-Net's default (on for CUDA)")}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', default='default')
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--steps', type=int, default=20, help='timed steps (and calls of each part) per stage')
    parser.add_argument('--warmup', type=int, default=None, help='untimed calls first (default: 2 on CUDA, 1 on CPU)')
    parser.add_argument('--max_batch', type=int, default=None, help='cap on the crops of one network call')
    parser.add_argument('--realct', default=DEFAULT_REALCT if isdir(DEFAULT_REALCT) else 'none',
                        help="folder of real CTs for the world (default ../shared/realct if there), 'none': phantoms")
    parser.add_argument('--real_ct', default=None, help=f'real CT for whole-CT inference (default {REAL_CT} there)')
    parser.add_argument('--ct_shape', type=int, nargs=3, default=[300, 512, 512], help='(z, y, x) synthetic CT')
    parser.add_argument('--step_size', type=float, default=0.5, help='sliding-window step of every predict arm')
    parser.add_argument('--network_time', action='store_true', help='also time the networks alone in-process')
    parser.add_argument('--no_inference', action='store_true', help='skip the whole-CT inference part')
    parser.add_argument('--shared_cores', action='store_true', help='record that other jobs shared the cores')
    parser.add_argument('--work', default=None, help='keep the world and outputs here (default: a temporary folder)')
    parser.add_argument('--out', default='benchmark_speed.json')
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 2 if args.device == 'cuda' else 1
    args.realct = None if args.realct == 'none' else args.realct
    if args.real_ct is None and args.realct and isfile(join(args.realct, REAL_CT)):
        args.real_ct = join(args.realct, REAL_CT)
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    base = {**machine(args, device), 'preset': args.preset, 'max_batch': args.max_batch, 'steps': args.steps,
            'warmup': args.warmup, 'step_size': args.step_size,
            'world': f'real CTs of {args.realct}' if args.realct else 'phantoms',
            'checkpoints': 'the weights of the timed steps in the stages\' real checkpoint format (speed only)'}
    work = args.work or tempfile.mkdtemp(prefix='bench_speed_')
    try:
        dataset = make_world(join(work, 'world'), args.preset, args.realct)
        training = bench_training(dataset, args, device)
        result = save(base, training, {}, device, args.out)  # a run cut short keeps what it measured
        if not args.no_inference:
            bench_inference(dataset, work, args, device,
                            lambda inference: result.update(save(base, training, inference, device, args.out)))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for name, value, target, met in result['targets']:
        print(f'{name:<32} {value:8.3f}  target {target:<6} {"met" if met else "MISSED"}')
    print(f'wrote {args.out}')


def save(base: dict, training: dict, inference: dict, device, out: str) -> dict:
    """The run's settings, the issue's summary keys and the targets, then the details; written to `out`."""
    result = {**base, **summary(training, inference, device)}
    result['targets'] = targets(result, device)
    result.update(training=training, inference=inference)
    os.makedirs(dirname(abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    sys.exit(main())
