"""Output folders a user names (`-o`): never a raw dataset or an nnU-Net folder, never over a file nnscreener did not
write, and writable before any compute. Every file a command writes there is listed, before it is written, in the
folder's manifest `nnscreener_manifest.json`, which is how a later run tells its own files from the user's."""
import json
import os
from os.path import abspath, dirname, isdir, isfile, join, realpath
from typing import Iterable, Optional

from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import TMP_PREFIX, atomic_save_json

MANIFEST_FILE = 'nnscreener_manifest.json'
RAW_DATASET_SUBFOLDERS = ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs')
NNUNET_FOLDERS = ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')
SHOWN = 5  # foreign files named in a message


def check_output_folder(folder: str, outputs: Iterable[str], only_ours: bool = False,
                        subfolders: Iterable[str] = ()) -> dict:
    """Refuses, with one line and before anything is written, an output folder that

    - is an existing file, a raw-dataset folder (imagesTr, labelsTr, imagesTs, labelsTs, or one holding a
      dataset.json) or lies in $nnUNet_raw, $nnUNet_preprocessed or $nnUNet_results;
    - holds one of `outputs` (file names relative to it) that its manifest does not list, or, with `only_ours`, any
      file there or in `subfolders` that its manifest does not list (left-over temporary files of our atomic writes
      are ours);
    - cannot be written (checked on the folder, or on its nearest existing parent: nothing is created).

    Returns the folder's manifest ({'files': []} for a new folder)."""
    _refuse_protected(folder)
    manifest = load_manifest(folder)
    ours = set(manifest['files']) | {MANIFEST_FILE}
    present = _files(folder, subfolders) if only_ours else [f for f in outputs if isfile(join(folder, f))]
    foreign = sorted(f for f in present if f not in ours and not os.path.basename(f).startswith(TMP_PREFIX))
    if foreign:
        raise ScreenerInputError(
            f'output folder {folder} holds {len(foreign)} file(s) nnscreener did not write '
            f'({", ".join(foreign[:SHOWN])}{" ..." if len(foreign) > SHOWN else ""}), which this run could overwrite '
            f'or mix with its own: choose a new or empty output folder')
    _refuse_unwritable(folder)
    return manifest


def claim_outputs(folder: str, names: Iterable[str], manifest: Optional[dict] = None) -> dict:
    """Lists `names` in the folder's manifest (atomically, creating the folder) before they are written, so a kill in
    between never leaves a file of ours that a later run takes for the user's. Returns the saved manifest."""
    manifest = load_manifest(folder) if manifest is None else manifest
    manifest['files'] = sorted(set(manifest['files']) | set(names))
    save_manifest(folder, manifest)
    return manifest


def load_manifest(folder: str) -> dict:
    fname = join(folder, MANIFEST_FILE)
    if not isfile(fname):
        return {'files': []}
    try:
        with open(fname) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get('files'), list):
            raise ValueError('no list of files')
    except (ValueError, AttributeError) as e:
        raise ScreenerInputError(f'{fname} is damaged ({e}): restore it, or write to a new output folder')
    return manifest


def save_manifest(folder: str, manifest: dict) -> None:
    atomic_save_json(manifest, join(folder, MANIFEST_FILE))


def _refuse_protected(folder: str) -> None:
    if os.path.exists(folder) and not isdir(folder):
        raise ScreenerInputError(f'output folder {folder} is an existing file: give a folder')
    real = realpath(folder)
    if os.path.basename(real) in RAW_DATASET_SUBFOLDERS or isfile(join(real, 'dataset.json')):
        raise ScreenerInputError(f'output folder {folder} is a raw dataset folder: writing there would mix outputs '
                                 f'with (or overwrite) images and labels; choose a folder outside the dataset')
    for name in NNUNET_FOLDERS:
        root = os.environ.get(name)
        if root and os.path.commonpath([real, realpath(root)]) == realpath(root):
            raise ScreenerInputError(f'output folder {folder} is inside ${name} ({root}), which nnU-Net manages: '
                                     f'choose a folder outside it')


def _refuse_unwritable(folder: str) -> None:
    existing = abspath(folder)
    while not os.path.exists(existing):
        existing = dirname(existing)
    if not isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ScreenerInputError(f'output folder {folder} cannot be written ({existing} is not a writable folder): '
                                 f'choose another one or fix its permissions')


def _files(folder: str, subfolders: Iterable[str]) -> list:
    """Files directly in `folder` and in its `subfolders` (names relative to `folder`)."""
    found = []
    for sub in ('', *subfolders):
        path = join(folder, sub)
        if isdir(path):
            found += [join(sub, f) if sub else f for f in os.listdir(path) if not isdir(join(path, f))]
    return found
