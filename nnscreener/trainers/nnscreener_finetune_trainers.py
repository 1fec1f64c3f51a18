"""Low-shot fine-tuning trainers: from the distilled Screener UNet, and from scratch with the same schedule.

Both differ from nnUNetTrainer only in the schedule, so a comparison isolates the pretraining. The distilled weights
come in through stock `-pretrained_weights`; nnU-Net's loader skips the `seg_layers`, which are thus re-initialised.
"""
from os.path import isdir

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnscreener.training.lr_schedule import WarmupDecayLRScheduler
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error


class nnScreenerFromScratchTrainer(nnUNetTrainer):
    """nnU-Net from random init with the low-shot schedule: 25 training cases do not need 1000 x 250 iterations.

    The linear warm-up (as in nnU-Net's nnUNetTrainer_warmup) protects pretrained features from the first large SGD
    steps; it is used from scratch too so that only the initialisation differs.
    """

    @exit_on_input_error  # nnUNetv2_train calls it: one line and exit code 2 instead of nnU-Net's late traceback
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not isdir(self.preprocessed_dataset_folder):
            raise ScreenerInputError(
                f'{self.preprocessed_dataset_folder} missing: nothing to fine-tune on. An image-only dataset (no '
                f'labelsTr) serves the Screener stages and nnScreener_predict only; a labeled one needs '
                f'nnScreener_plan_and_preprocess -d {self.plans_manager.dataset_name} first')
        self.num_epochs = 300
        self.warmup_epochs = 20

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, WarmupDecayLRScheduler(optimizer, self.initial_lr, self.warmup_epochs, self.num_epochs,
                                                 decay='poly')


class nnScreenerFinetuneTrainer(nnScreenerFromScratchTrainer):
    """Use with `-pretrained_weights <distilled checkpoint_final.pth>`."""


class nnScreenerFromScratchTrainer_100epochs(nnScreenerFromScratchTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.warmup_epochs = 100, 10


class nnScreenerFinetuneTrainer_100epochs(nnScreenerFromScratchTrainer_100epochs):
    pass


class nnScreenerFromScratchTrainer_tiny(nnScreenerFromScratchTrainer):
    """A CPU smoke-test schedule (tests, the phantom demo): 2 epochs of 3 iterations, no mirroring (neither as
    augmentation nor at validation, where it would multiply CPU time by 8)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.warmup_epochs = 2, 1
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 3, 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class nnScreenerFinetuneTrainer_tiny(nnScreenerFromScratchTrainer_tiny):
    pass


class nnScreenerFromScratchTrainer_cpuBenchmark(nnScreenerFromScratchTrainer_tiny):
    """The CPU low-shot benchmark (benchmarks/quality): 12 epochs of 20 iterations, no mirroring (as _tiny)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.warmup_epochs = 12, 2
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 20, 3


class nnScreenerFinetuneTrainer_cpuBenchmark(nnScreenerFromScratchTrainer_cpuBenchmark):
    pass


class nnScreenerFromScratchTrainer_cpuLowshot(nnScreenerFromScratchTrainer_tiny):
    """The CPU low-shot benchmark (benchmarks/quality/lowshot_benchmark.py), sized by measurement on 2 cores
    (documentation/benchmarks.md): 300 epochs x 50 steps of 4 patches, two of them around a lesion, nnU-Net's lr 1e-2
    after 2 warm-up epochs, no mirroring (as _tiny), one torch thread on the CPU. Why these numbers:
    - 300 epochs: at 100 (with the plans' batch Dice) both arms predicted 3-12 times the lesion volume (folds 0-1),
      Dice 0.15 from scratch; in fold 0, 300 epochs cut that to 1.3-1.7 times and raised Dice to 0.26 (0.29 fine-tuned);
    - 2 of 4 patches around a lesion: the 16 x 24 x 24 patch shows little background around a lesion, so with per-patch
      Dice at 100 epochs this left 70-100 false-positive blobs per case (1 of 4 was used then); with batch Dice and 300
      epochs it no longer does, and over 3 folds it raised from-scratch Dice from 0.24 to 0.31 and 0.33 (two runs);
    - one thread: the benchmark trains its two arms side by side on 2 cores, and `nnUNetv2_train -device cpu` gives
      each `cpu_count()` threads (measured 0.29 s per step against 0.12 s with one).
    The Finetune twin differs only in its initialisation (`-pretrained_weights`)."""
    EPOCHS, WARMUP_EPOCHS, ITERATIONS, VAL_ITERATIONS = 300, 2, 50, 4
    BATCH, FOREGROUND_PATCHES = 4, 0.5  # nnU-Net's loader: round(4 * (1 - 0.5)) = 2 random patches, 2 around a lesion
    CPU_THREADS = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.warmup_epochs = self.EPOCHS, self.WARMUP_EPOCHS
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = self.ITERATIONS, self.VAL_ITERATIONS
        self.configuration_manager.configuration['batch_size'] = self.BATCH  # read by nnU-Net in initialize()
        self.oversample_foreground_percent = self.FOREGROUND_PATCHES

    def on_train_start(self):
        # here, not in __init__: nnUNetv2_train sets cpu_count() threads before it builds the trainer, and a trainer
        # built only to be inspected (tests) leaves its process alone; the final validation keeps the one thread
        if self.device.type == 'cpu':
            torch.set_num_threads(self.CPU_THREADS)
        super().on_train_start()


class nnScreenerFinetuneTrainer_cpuLowshot(nnScreenerFromScratchTrainer_cpuLowshot):
    pass
