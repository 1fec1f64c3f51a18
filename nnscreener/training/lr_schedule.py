"""Linear warm-up from 0, then decay to 0: the paper's SSL schedule and the fine-tuning warm-up."""
import math

from torch.optim.lr_scheduler import _LRScheduler


def warmup_decay_lr(step: int, peak_lr: float, warmup_steps: int, max_steps: int, decay: str = 'cosine') -> float:
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if decay == 'cosine':
        return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))
    if decay == 'poly':  # nnU-Net's PolyLRScheduler exponent
        return peak_lr * (1 - progress) ** 0.9
    raise ValueError(f'unknown decay {decay!r}')


class WarmupDecayLRScheduler(_LRScheduler):
    """Stateless in the step: `step(k)` sets the lr of step k, so resuming only needs the step counter."""

    def __init__(self, optimizer, peak_lr: float, warmup_steps: int, max_steps: int, decay: str = 'cosine'):
        self.peak_lr, self.warmup_steps, self.max_steps, self.decay = peak_lr, warmup_steps, max_steps, decay
        self.ctr = 0
        super().__init__(optimizer)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = warmup_decay_lr(current_step, self.peak_lr, self.warmup_steps, self.max_steps, self.decay)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)
