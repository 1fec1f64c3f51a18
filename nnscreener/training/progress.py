"""Loss history of a Screener stage: log means and a loss-curve PNG (what a person looks at first)."""
from collections import defaultdict
from typing import Dict

import numpy as np


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
