"""Atomic writes (a killed process never leaves a half-written file under the final name) and the one reader of
users' images, which refuses incomplete files."""
import gzip
import hashlib
import json
import math
import os
import pathlib
import struct
import tempfile
import zlib
from contextlib import contextmanager
from typing import Optional

import numpy as np
import SimpleITK as sitk

from nnscreener.utilities.errors import ScreenerInputError

GZIP_MAGIC = b'\x1f\x8b'
TMP_PREFIX = '.tmp_'  # atomic_path's temporary files: what a killed process may leave behind
CHUNK_BYTES = 1 << 20  # streaming reads (gzip check, hashes) hold one chunk at a time
# NIfTI-1 / NIfTI-2 single-file headers: (sizeof_hdr, magic offset, magic, dim format, dim offset, bitpix offset,
# vox_offset format and offset), from the NIfTI standard
NIFTI_HEADERS = ((348, 344, b'n+1\0', '8h', 40, 72, 'f', 108), (540, 4, b'n+2\0', '8q', 16, 14, 'q', 168))


@contextmanager
def atomic_path(fname: str):
    """Yields a temporary path in the same folder (same extensions, so writers pick the right format); it is renamed
    to `fname` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(fname))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=''.join(pathlib.Path(fname).suffixes) or '.tmp')
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


def file_sha256(fname: str) -> str:
    digest = hashlib.sha256()
    with open(fname, 'rb') as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_image(fname: str) -> sitk.Image:
    """SimpleITK image of a file a user gave us, after `check_image_complete`; a missing, truncated or unreadable
    file is one ScreenerInputError line naming it."""
    if not os.path.isfile(fname):
        raise ScreenerInputError(f'{fname} does not exist')
    check_image_complete(fname)
    try:
        return sitk.ReadImage(fname)
    except RuntimeError as e:
        raise ScreenerInputError(f'cannot read {fname}: file is corrupt or not an image '
                                 f'({str(e).strip().splitlines()[-1]})')


def check_image_complete(fname: str) -> None:
    """Refuses a NIfTI file (.nii.gz, .nii) that holds less voxel data than its header describes, or whose gzip
    stream is cut short or fails its CRC/length check: SimpleITK reads such a file without complaint and fills the
    missing slices with zeros. A gzip stream is decompressed in chunks (one chunk in memory). Files that are no
    NIfTI and other formats are left to SimpleITK: it refuses them, and incomplete MetaImage (.mha) and NRRD data."""
    if not fname.lower().endswith(('.nii', '.nii.gz')):
        return
    with open(fname, 'rb') as f:
        head = f.read(NIFTI_HEADERS[1][0])
    # by content, not by name, as SimpleITK's NIfTI reader does: a .nii.gz may hold a plain NIfTI, and vice versa
    head, size = _gunzipped_head_and_size(fname) if head.startswith(GZIP_MAGIC) else (head, os.path.getsize(fname))
    expected = nifti_file_size(head)
    if expected is not None and size < expected:
        raise ScreenerInputError(f'{fname} is truncated: its header describes {expected} bytes of NIfTI, the file '
                                 f'holds {size} ({100 * size / expected:.0f}%); copy it again from its source')


def _gunzipped_head_and_size(fname: str):
    """(first bytes, length) of the decompressed file; gzip verifies each member's CRC and length at its end."""
    head, size = b'', 0
    try:
        with gzip.open(fname, 'rb') as f:
            while chunk := f.read(CHUNK_BYTES):
                head += chunk[:NIFTI_HEADERS[1][0] - len(head)]
                size += len(chunk)
    except EOFError:
        raise ScreenerInputError(f'{fname} is truncated: its gzip stream stops before its end marker (file of '
                                 f'{os.path.getsize(fname)} bytes); copy it again from its source')
    except (gzip.BadGzipFile, zlib.error) as e:
        raise ScreenerInputError(f'{fname} is corrupt: its gzip data fail to decompress ({e}); copy it again from '
                                 f'its source')
    return head, size


def nifti_file_size(head: bytes) -> Optional[int]:
    """vox_offset + voxels * bitpix / 8 of a single-file NIfTI-1 or NIfTI-2 header (either byte order), i.e. the
    least size of a complete file; None when `head` is no such header (SimpleITK then says what is wrong)."""
    for sizeof_hdr, magic_at, magic, dim_format, dim_at, bitpix_at, offset_format, offset_at in NIFTI_HEADERS:
        if len(head) < sizeof_hdr or head[magic_at:magic_at + len(magic)] != magic:
            continue
        for order in '<>':
            if struct.unpack_from(order + 'i', head)[0] != sizeof_hdr:
                continue
            dim = struct.unpack_from(order + dim_format, head, dim_at)
            bitpix = struct.unpack_from(order + 'h', head, bitpix_at)[0]
            vox_offset = struct.unpack_from(order + offset_format, head, offset_at)[0]
            if not 1 <= dim[0] <= 7 or min(dim[1:dim[0] + 1]) < 0 or bitpix <= 0:
                return None
            return int(vox_offset) + math.prod(dim[1:dim[0] + 1]) * bitpix // 8
    return None
