"""Progress of Screener stages: the console bar over all stages of a pretraining, and each stage's loss history
(log means and a loss-curve PNG, what a person looks at first)."""
from collections import defaultdict
from typing import Dict, NamedTuple

import numpy as np

from nnscreener.utilities.console import progress_bar


class StageProgress(NamedTuple):
    """Where one stage run sits in its pretraining (sent to DDP workers, so plain values): its bar counts the steps
    of all stages, so tqdm's ETA is that of the whole pretraining at the current stage's speed."""
    desc: str  # e.g. 'pretrain stage 2/4 condition (nnScreenerConditionTrainer)'
    steps_before: int  # steps of the earlier stages of this pretraining
    steps_total: int  # steps of all its stages
    last: bool  # the last stage: its bar stays on the console; the others give their line to the next one

    def bar(self, current_step: int):
        return progress_bar(desc=self.desc, total=self.steps_total, initial=self.steps_before + current_step,
                            leave=self.last, unit='step',
                            bar_format='{desc}: {percentage:3.0f}% of all stages, {n_fmt}/{total_fmt} steps '
                                       '[stage {elapsed}, ETA of all {remaining}, {rate_fmt}]')


class LossHistory:
    def __init__(self):
        self.steps = []
        self.values: Dict[str, list] = defaultdict(list)

    def append(self, step: int, logs: dict) -> None:
        self.steps.append(step)
        for k, v in logs.items():
            self.values[k].append(float(v))

    def recent_means(self, n: int) -> dict:
        return {k: float(np.mean(v[-n:])) for k, v in self.values.items()}

    def state_dict(self) -> dict:
        return {'steps': list(self.steps), 'values': {k: list(v) for k, v in self.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state['steps'])
        self.values = defaultdict(list, {k: list(v) for k, v in state['values'].items()})

    def plot(self, png_file: str, title: str) -> None:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from nnscreener.utilities.io import atomic_path
        keys = list(self.values)
        if not keys:  # nothing trained yet
            return
        fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 * len(keys)), sharex=True, squeeze=False)
        for ax, k in zip(axes[:, 0], keys):
            ax.plot(self.steps, self.values[k], lw=0.8)
            ax.set_ylabel(k)
        axes[-1, 0].set_xlabel('step')
        axes[0, 0].set_title(title)
        fig.tight_layout()
        with atomic_path(png_file) as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)
