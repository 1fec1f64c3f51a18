"""nnU-Net folders and dataset names, with one-line errors instead of nnU-Net's tracebacks."""
import os
from os.path import isdir, join

from nnscreener.utilities.errors import ScreenerInputError

ENV_HELP = {
    'nnUNet_raw': 'the folder with your nnU-Net raw datasets (DatasetXXX_Name/imagesTr ...)',
    'nnUNet_preprocessed': 'the folder where nnU-Net writes plans and preprocessed data',
    'nnUNet_results': 'the folder where nnU-Net writes trained models',
}


def require_env(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        hints = '; '.join(f'export {n}=/path/to/{n} ({ENV_HELP[n]})' for n in missing)
        raise ScreenerInputError(f"environment variable(s) {', '.join(missing)} not set: {hints}")


def dataset_name(dataset_name_or_id) -> str:
    """DatasetXXX_Name for an id or name; unknown ids become a one-line error."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except (RuntimeError, ValueError) as e:
        raise ScreenerInputError(f'unknown dataset {dataset_name_or_id!r}: no DatasetXXX_Name folder with that id '
                                 f'in nnUNet_raw, nnUNet_preprocessed or nnUNet_results ({str(e).splitlines()[0]})')


def raw_dataset_folder(name: str) -> str:
    folder = join(os.environ['nnUNet_raw'], name)
    if not isdir(folder):
        raise ScreenerInputError(f'raw dataset folder {folder} does not exist; create it in nnU-Net format first')
    return folder


def preprocessed_dataset_folder(name: str) -> str:
    return join(os.environ['nnUNet_preprocessed'], name)
