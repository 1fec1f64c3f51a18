"""Atomic writes: a killed process never leaves a half-written file under the final name."""
import json
import os
import pathlib
import tempfile
from contextlib import contextmanager

import numpy as np


@contextmanager
def atomic_path(fname: str):
    """Yields a temporary path in the same folder (same extensions, so writers pick the right format); it is renamed
    to `fname` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(fname))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp_', suffix=''.join(pathlib.Path(fname).suffixes) or '.tmp')
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the final file gets the usual permissions
        os.replace(tmp, fname)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_npy(fname: str, array: np.ndarray) -> None:
    with atomic_path(fname) as tmp:
        with open(tmp, 'wb') as f:
            np.save(f, array)


def atomic_save_json(obj, fname: str) -> None:
    with atomic_path(fname) as tmp:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)


def atomic_save_text(text: str, fname: str) -> None:
    with atomic_path(fname) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
