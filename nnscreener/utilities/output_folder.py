"""Output folders a user names (`-o`): never a raw dataset or an nnU-Net folder, never over a file nnscreener did not
write, and writable before any compute. Every file a command writes there is listed, before it is written, in the
folder's manifest `nnscreener_manifest.json`, which is how a later run tells its own files from the user's."""
import json
import os
from contextlib import contextmanager
from os.path import abspath, dirname, isdir, isfile, join, realpath
from typing import Iterable, Optional

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent commands into one folder are then not refused
    fcntl = None

from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.io import TMP_PREFIX, atomic_save_json

MANIFEST_FILE = 'nnscreener_manifest.json'
LOCK_FILE = '.nnscreener_lock'  # held (flock) by the command writing into the folder
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
    ours = set(manifest['files']) | {MANIFEST_FILE, LOCK_FILE}
    present = _files(folder, subfolders) if only_ours else [f for f in outputs if isfile(join(folder, f))]
    foreign = sorted(f for f in present if f not in ours and not os.path.basename(f).startswith(TMP_PREFIX))
    if foreign:
        raise ScreenerInputError(
            f'output folder {folder} holds {len(foreign)} file(s) nnscreener did not write '
            f'({", ".join(foreign[:SHOWN])}{" ..." if len(foreign) > SHOWN else ""}), which this run could overwrite '
            f'or mix with its own: choose a new or empty output folder')
    _refuse_unwritable(folder)
    return manifest


@contextmanager
def output_folder_lock(folder: str, subfolders: Iterable[str] = ()):
    """The folder (created if new) held by this command alone while the block runs.

    A second command into the same folder is refused with one line: two runs rewriting one manifest and one scores
    file would each drop the other's entries. The lock is the kernel's flock on `LOCK_FILE`, so a killed holder
    never leaves it stuck. With the lock held, the temporary files of atomic writes a killed run left in the folder
    (and in `subfolders`) are removed: nobody else can be writing them. If the block fails and the folder was new,
    it is removed again unless a listed output was written, so an early error leaves no empty output folder."""
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _lock(fd, folder)
        _remove_temporary_files(folder, subfolders)
        try:
            yield
        except BaseException:
            if created:
                _remove_if_nothing_written(folder)
            raise
    finally:
        os.close(fd)


def _lock(fd: int, folder: str) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ScreenerInputError(f'output folder {folder} is in use by another running nnscreener command: wait '
                                 f'until it ends, or write to another folder')


def _remove_temporary_files(folder: str, subfolders: Iterable[str]) -> None:
    for name in _files(folder, subfolders):
        if os.path.basename(name).startswith(TMP_PREFIX):
            os.remove(join(folder, name))


def _remove_if_nothing_written(folder: str) -> None:
    """Removes a folder this command created if it holds nothing but its manifest and lock file."""
    manifest = load_manifest(folder)
    if any(os.path.exists(join(folder, f)) for f in manifest['files']):
        return
    for name in (MANIFEST_FILE, LOCK_FILE):
        if isfile(join(folder, name)):
            os.remove(join(folder, name))
    for sub in sorted({dirname(f) for f in manifest['files'] if dirname(f)}, reverse=True):
        if isdir(join(folder, sub)) and not os.listdir(join(folder, sub)):
            os.rmdir(join(folder, sub))
    if not os.listdir(folder):
        os.rmdir(folder)


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
