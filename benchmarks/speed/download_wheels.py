"""Downloads the wheels that benchmarks/speed/gpu_check.sh installs on a GPU machine that reaches no package index.

    python benchmarks/speed/download_wheels.py                                # -> benchmarks/speed/wheels (gitignored)
    python benchmarks/speed/download_wheels.py --python 3.11 --dest /tmp/w311  # the same set for a local dry run

The lent machine (device README / KINDS.md) has Python 3.12 with torch, numpy, scipy, scikit-image, scikit-learn,
pandas, matplotlib, seaborn, tifffile, einops, timm, msgpack, rich, httpx and threadpoolctl, but none of the packages
below. They are what nnscreener and nnU-Net import on the plan / pretrain / predict / benchmark paths, found by
recording the imports of those paths; each is installed without its own dependencies (pip --no-deps), so nnU-Net's
extras that these paths never import (graphviz, imagecodecs, yacs, ...) stay out. acvl-utils has no wheel on PyPI:
it is built here (pure Python). Binary wheels are re-zipped with LZMA compression (pip reads it; the RECORD hashes are
of the unpacked files), which takes SimpleITK from 53 to 29 MB, so that the set fits the 64 MiB a device call carries.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from os.path import abspath, dirname, join

# the versions this project's tests ran with
PACKAGES = ['nnunetv2==2.8.1', 'SimpleITK==2.5.7', 'batchgenerators==0.25.5', 'batchgeneratorsv2==0.3.6',
            'dynamic-network-architectures==0.4.4', 'blosc2==4.14.1', 'numexpr==2.14.2', 'ndindex==1.10.1',
            'nibabel==5.4.2', 'connected-components-3d==4.1.1']
SOURCE_ONLY = ['acvl-utils==0.2.6']  # no wheel on PyPI
PLATFORMS = ['manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_24_x86_64', 'manylinux_2_17_x86_64',
             'manylinux2014_x86_64']


def download(dest: str, python: str) -> None:
    platforms = [a for p in PLATFORMS for a in ('--platform', p)]
    pip = [sys.executable, '-m', 'pip']
    subprocess.run(pip + ['download', '--no-deps', '--only-binary=:all:', '--python-version', python,
                          '--implementation', 'cp', *platforms, '-d', dest, *PACKAGES], check=True)
    subprocess.run(pip + ['wheel', '--no-deps', '-w', dest, *SOURCE_ONLY], check=True)


def lzma_rezip(wheel: str) -> None:
    """The same wheel with LZMA-compressed members, replacing it atomically."""
    tmp = tempfile.NamedTemporaryFile(dir=dirname(wheel), suffix='.tmp', delete=False).name
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_LZMA) as target:
        for info in source.infolist():
            target.writestr(info, source.read(info), compress_type=zipfile.ZIP_LZMA)
    os.chmod(tmp, 0o644)  # NamedTemporaryFile's 0600
    os.replace(tmp, wheel)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dest', default=join(dirname(abspath(__file__)), 'wheels'))
    parser.add_argument('--python', default='3.12', help='Python version of the machine the wheels are for')
    args = parser.parse_args()
    os.makedirs(args.dest, exist_ok=True)
    download(args.dest, args.python)
    for name in sorted(os.listdir(args.dest)):
        path = join(args.dest, name)
        if name.endswith('.whl') and '-none-any' not in name:  # pure-Python wheels are small already
            with zipfile.ZipFile(path) as wheel:
                lzma = all(i.compress_type == zipfile.ZIP_LZMA for i in wheel.infolist())
            if not lzma:
                print(f'LZMA: {name}', flush=True)
                lzma_rezip(path)
    total = sum(os.path.getsize(join(args.dest, f)) for f in os.listdir(args.dest))
    print(f'{args.dest}: {len(os.listdir(args.dest))} wheels, {total / 2 ** 20:.1f} MiB')


if __name__ == '__main__':
    main()
