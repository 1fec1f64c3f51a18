"""Runs stock `nnUNetv2_train` for the low-shot comparison exactly as a user would type it (demo, benchmarks)."""
import glob
import os
import subprocess
from os.path import isfile, join
from typing import Optional

from tqdm import tqdm

from nnscreener.planners.screener_planner import CONFIGURATION, SCREENER_PLANS_NAME
from nnscreener.utilities.console import output_to_log


def nnunet_train(dataset_id: int, fold: int, trainer: str, pretrained_weights: Optional[str], device: str,
                 num_processes: int, log_file: Optional[str] = None) -> None:
    """`nnUNetv2_train <id> 3d_fullres <fold> -p nnScreenerPlans -tr <trainer>`; skipped when the fold's validation
    summary exists. nnU-Net's worker counts are capped for small machines (its defaults start 8 export and 12
    augmentation processes). log_file: where nnU-Net's console output goes (appended); default: the console."""
    output = glob.glob(join(os.environ['nnUNet_results'], f'Dataset{dataset_id:03d}_*',
                            f'{trainer}__{SCREENER_PLANS_NAME}__{CONFIGURATION}', f'fold_{fold}'))
    if output and isfile(join(output[0], 'validation', 'summary.json')):
        tqdm.write(f'{trainer} fold {fold}: done earlier')  # above a progress bar of the caller, if there is one
        return
    command = ['nnUNetv2_train', str(dataset_id), CONFIGURATION, str(fold), '-p', SCREENER_PLANS_NAME, '-tr', trainer,
               '-device', device] + (['-pretrained_weights', pretrained_weights] if pretrained_weights else [])
    env = {'nnUNet_def_n_proc': str(num_processes), 'nnUNet_n_proc_DA': str(num_processes), **os.environ}
    if log_file is None:
        print(' '.join(command), flush=True)
        subprocess.run(command, env=env, check=True)
        return
    with output_to_log(log_file, ' '.join(command)):
        returncode = subprocess.run(command, env=env).returncode
    if returncode:
        raise RuntimeError(f'{" ".join(command)} failed (exit code {returncode}); its output is at the end of '
                           f'{log_file}')
