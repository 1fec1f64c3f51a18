"""A DDP step on two gloo processes equals one process on the concatenated batch: same loss, same update.

Screener's VICReg variance / covariance and InfoNCE's negatives are over the whole global batch, so the embeddings are
all-gathered across ranks (`gather_across_ranks`). If the gather were missing, each rank would compute the terms on
its half only (another loss); if it were not differentiable, each rank's gradient would miss the other ranks' terms
(another update). The step is the stage trainers' own `train_step` (DDP objective, gradient clipping, optimiser step).
"""
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from batchgenerators.utilities.file_and_folder_operations import join
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnscreener.ssl.augment import ColourJitter, ColourJitterConfig
from nnscreener.ssl.losses import build_ssl_loss
from nnscreener.ssl.objective import DenseSSLObjective
from nnscreener.training.stage_trainer import nnScreenerStageTrainer

WORLD, BATCH, PATCH, PAIRS = 2, 4, (6, 8, 8), 24
LOSSES = {'vicreg': {'expander_dims': (16, 16)}, 'infonce': {'projector_dims': (16, 8), 'tau': 0.2}}
NO_JITTER = ColourJitterConfig(blur_or_sharpen_p=0, noise_p=0, brightness_p=0, contrast_p=0, gamma_p=0)


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    upper = torch.tensor(PATCH, dtype=torch.float32) - 1
    return {'view1': torch.rand(BATCH, 1, *PATCH, generator=g), 'view2': torch.rand(BATCH, 1, *PATCH, generator=g),
            'coords1': torch.rand(BATCH, PAIRS, 3, generator=g) * upper,
            'coords2': torch.rand(BATCH, PAIRS, 3, generator=g) * upper}


def _objective(loss_name: str) -> DenseSSLObjective:
    torch.manual_seed(1)  # every rank starts from the same weights, as DDP's broadcast would make them anyway
    network = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU(),
                            nn.Conv3d(8, 6, 3, padding=1))
    objective = DenseSSLObjective(network, build_ssl_loss(loss_name, 6, **LOSSES[loss_name]))
    objective.jitter = ColourJitter(NO_JITTER)  # random per rank otherwise; the step, not the augmentation, is tested
    return objective


def _train_step(objective: nn.Module, trained: nn.Module, batch: dict) -> tuple[float, torch.Tensor]:
    """One step of the stage trainers' train_step; returns the loss and the parameters after the update."""
    # SGD, and a clip that does not engage: the update is then proportional to the gradient (Adam's first step and an
    # engaged clip would hide a gradient off by a factor)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    trainer = types.SimpleNamespace(device=torch.device('cpu'), optimizer=optimizer, trained=trained,
                                    objective=objective, stage_settings=types.SimpleNamespace(grad_clip=1e6),
                                    autocast=nnScreenerStageTrainer.autocast.__get__(
                                        types.SimpleNamespace(device=torch.device('cpu'))))
    loss = nnScreenerStageTrainer.train_step(trainer, batch)['loss']
    return loss, torch.cat([p.detach().flatten() for p in objective.parameters()])


def _ddp_rank(rank: int, loss_name: str, folder: str):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{join(folder, "rendezvous")}', rank=rank, world_size=WORLD)
    try:
        per_rank = BATCH // WORLD
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in _global_batch().items()}
        objective = _objective(loss_name)
        torch.save(_train_step(objective, DDP(objective), batch), join(folder, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('loss_name', list(LOSSES))
def test_two_gloo_ranks_give_the_loss_and_update_of_one_process_on_the_whole_batch(loss_name, tmp_path):
    objective = _objective(loss_name)
    loss, params = _train_step(objective, objective, _global_batch())
    mp.spawn(_ddp_rank, args=(loss_name, str(tmp_path)), nprocs=WORLD, join=True)
    initial = torch.cat([p.detach().flatten() for p in _objective(loss_name).parameters()])
    for rank in range(WORLD):
        rank_loss, rank_params = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        assert rank_loss == pytest.approx(loss, rel=1e-5), (rank, rank_loss, loss)
        torch.testing.assert_close(rank_params - initial, params - initial, rtol=1e-4, atol=1e-6)
