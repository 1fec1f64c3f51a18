"""Atomic writes (a killed process never leaves a half-written file under the final name) and the one reader of
users' images, which refuses incomplete files."""
import gzip
import hashlib
import json
import locale
import math
import os
import pathlib
import struct
import tempfile
import zlib
from contextlib import contextmanager
from typing import NamedTuple, Optional

import numpy as np
import SimpleITK as sitk

from nnscreener.utilities.errors import ScreenerInputError

GZIP_MAGIC = b'\x1f\x8b'
TMP_PREFIX = '.tmp_'  # atomic_path's temporary files: what a killed process may leave behind
CHUNK_BYTES = 1 << 20  # streaming reads (gzip check, hashes) hold one chunk at a time
NON_UNIFORM_SAMPLING_KEY = 'ITK_non_uniform_sampling_deviation'  # set by ImageSeriesReader on uneven slices
# NIfTI-1 / NIfTI-2 single-file headers: (sizeof_hdr, magic offset, magic, dim format, dim offset, datatype offset,
# bitpix offset, vox_offset format and offset), from the NIfTI standard
NIFTI_HEADERS = ((348, 344, b'n+1\0', '8h', 40, 70, 72, 'f', 108), (540, 4, b'n+2\0', '8q', 16, 12, 14, 'q', 168))
NIFTI_FLOAT_TYPES = {16: np.float32, 64: np.float64}  # NIfTI datatype codes (DT_FLOAT32, DT_FLOAT64)


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
    """SimpleITK image of a file a user gave us, after `check_image_complete`, or of a folder holding one DICOM
    series (`read_dicom_series`); a missing, truncated or unreadable file is one ScreenerInputError line naming it."""
    if os.path.isdir(fname):
        return read_dicom_series(fname)
    if not os.path.isfile(fname):
        raise ScreenerInputError(f'{fname} does not exist')
    check_image_complete(fname)
    try:
        return sitk.ReadImage(fname)
    except RuntimeError as e:
        raise ScreenerInputError(f'cannot read {fname}: file is corrupt or not an image '
                                 f'({str(e).strip().splitlines()[-1]})')


@contextmanager
def gdcm_guard():
    """Around SimpleITK's DICOM (GDCM) calls: their warnings (no series found, uneven slices) stay off stderr, as we
    check and say what is wrong ourselves, in one line; and the process's C locale is restored afterwards, because
    GDCM sets it to "C", after which Python decodes subprocess output and opens text files as ASCII."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    saved_locale = locale.setlocale(locale.LC_ALL)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
        locale.setlocale(locale.LC_ALL, saved_locale)


def dicom_series_id(folder: str) -> Optional[str]:
    """The SeriesInstanceUID of the DICOM files directly in `folder` (GDCM reads their headers; subfolders are not
    searched), None when it holds none; a folder holding several series is refused: one series per folder, so that
    the folder's name can be the case's."""
    with gdcm_guard():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if len(series) > 1:
        raise ScreenerInputError(f'{folder} holds {len(series)} DICOM series: nnscreener reads one series per folder; '
                                 f'move each series into a folder of its own (the folder name is the case name)')
    return series[0] if series else None


def read_dicom_series(folder: str) -> sitk.Image:
    """The 3D image of the one DICOM series in `folder` (SimpleITK's ImageSeriesReader: slices sorted along the
    slice normal by ImagePositionPatient, Rescale Slope / Intercept applied, so CT voxels are HU). Refused with one
    line: no series, several series, unreadable slices, or slices not evenly spaced (a missing slice: the reader
    would stretch the volume over the gap)."""
    series = dicom_series_id(folder)
    if series is None:
        raise ScreenerInputError(f'{folder} holds no DICOM series (and is no image file): give CT files or folders '
                                 f'each holding one DICOM series')
    reader = sitk.ImageSeriesReader()
    try:
        with gdcm_guard():
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series))
            image = reader.Execute()
    except RuntimeError as e:
        raise ScreenerInputError(f'cannot read the DICOM series in {folder}: a slice is corrupt or not an image '
                                 f'({str(e).strip().splitlines()[-1]})')
    if image.HasMetaDataKey(NON_UNIFORM_SAMPLING_KEY):
        raise ScreenerInputError(f'the DICOM slices in {folder} are not evenly spaced (a missing or extra slice?): '
                                 f'export the complete series again')
    return image


def input_size_and_mtime(path: str) -> tuple:
    """(bytes, newest mtime_ns) of an input: a file, or a series folder (its files, so a replaced slice counts)."""
    if not os.path.isdir(path):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    stats = [os.stat(e.path) for e in os.scandir(path) if e.is_file() and not e.name.startswith('.')]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def check_image_complete(fname: str) -> None:
    """Refuses a NIfTI file (.nii.gz, .nii) that SimpleITK would read without complaint but wrongly:

    - less voxel data than its header describes, or a gzip stream cut short or failing its CRC/length check
      (SimpleITK fills the missing slices with zeros);
    - NaN or infinite voxels in float data (SimpleITK's NIfTI reader turns them into 0, i.e. water in HU).

    One streaming pass over the (decompressed) file, one chunk in memory. Files that are no NIfTI and other formats
    are left to SimpleITK: it refuses them, and incomplete MetaImage (.mha) and NRRD data, and keeps their NaNs (which
    `check_ct_image` refuses)."""
    if not fname.lower().endswith(('.nii', '.nii.gz')):
        return
    scan = _NiftiScan()
    for chunk in _nifti_chunks(fname):
        scan.feed(chunk)
    if scan.layout is not None and scan.size < scan.layout.end:
        raise ScreenerInputError(f'{fname} is truncated: its header describes {scan.layout.end} bytes of NIfTI, the '
                                 f'file holds {scan.size} ({100 * scan.size / scan.layout.end:.0f}%); copy it again '
                                 f'from its source')
    if scan.non_finite:
        raise ScreenerInputError(f'{fname} contains {scan.non_finite} NaN/inf voxels, which would be read as 0 HU: '
                                 f'fill them (e.g. with -1000 HU) and run again')


def _nifti_chunks(fname: str):
    """The file's bytes, decompressed if it is gzip (by content, not by name, as SimpleITK's NIfTI reader does: a
    .nii.gz may hold a plain NIfTI, and vice versa); gzip verifies each member's CRC and length at its end."""
    with open(fname, 'rb') as f:
        compressed = f.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    try:
        with (gzip.open if compressed else open)(fname, 'rb') as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk
    except EOFError:
        raise ScreenerInputError(f'{fname} is truncated: its gzip stream stops before its end marker (file of '
                                 f'{os.path.getsize(fname)} bytes); copy it again from its source')
    except (gzip.BadGzipFile, zlib.error) as e:
        raise ScreenerInputError(f'{fname} is corrupt: its gzip data fail to decompress ({e}); copy it again from '
                                 f'its source')


class NiftiLayout(NamedTuple):
    start: int  # vox_offset: first byte of the voxel data
    end: int  # one past its last byte: the least size of a complete file
    float_dtype: Optional[np.dtype]  # the voxels' dtype (with byte order) if they are float32/float64, else None


class _NiftiScan:
    """Fed the file's bytes in order: its size, its layout once the header is in, and the count of non-finite float
    voxels (items split across chunks are carried over)."""

    def __init__(self):
        self.size, self.non_finite, self.layout, self._head, self._carry = 0, 0, None, b'', b''

    def feed(self, chunk: bytes) -> None:
        offset, self.size = self.size, self.size + len(chunk)
        if self.layout is None and len(self._head) < NIFTI_HEADERS[1][0]:
            self._head += chunk[:NIFTI_HEADERS[1][0] - len(self._head)]
            self.layout = nifti_layout(self._head)
        if self.layout is None or self.layout.float_dtype is None:
            return
        data = chunk[max(0, self.layout.start - offset):max(0, self.layout.end - offset)]
        data, item = self._carry + data, self.layout.float_dtype.itemsize
        usable = len(data) - len(data) % item
        self._carry = data[usable:]
        self.non_finite += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], self.layout.float_dtype))))


def nifti_layout(head: bytes) -> Optional[NiftiLayout]:
    """Where the voxels of a single-file NIfTI-1 or NIfTI-2 header (either byte order) lie, and their float dtype;
    None when `head` is no complete such header (SimpleITK then says what is wrong)."""
    for (sizeof_hdr, magic_at, magic, dim_format, dim_at, datatype_at, bitpix_at, offset_format,
         offset_at) in NIFTI_HEADERS:
        if len(head) < sizeof_hdr or head[magic_at:magic_at + len(magic)] != magic:
            continue
        for order in '<>':
            if struct.unpack_from(order + 'i', head)[0] != sizeof_hdr:
                continue
            dim = struct.unpack_from(order + dim_format, head, dim_at)
            datatype = struct.unpack_from(order + 'h', head, datatype_at)[0]
            bitpix = struct.unpack_from(order + 'h', head, bitpix_at)[0]
            vox_offset = int(struct.unpack_from(order + offset_format, head, offset_at)[0])
            if not 1 <= dim[0] <= 7 or min(dim[1:dim[0] + 1]) < 0 or bitpix <= 0:
                return None
            float_dtype = NIFTI_FLOAT_TYPES.get(datatype)
            return NiftiLayout(vox_offset, vox_offset + math.prod(dim[1:dim[0] + 1]) * bitpix // 8,
                               np.dtype(float_dtype).newbyteorder(order) if float_dtype else None)
    return None
