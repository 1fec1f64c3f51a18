"""nnscreener: Screener (unsupervised pathology segmentation in 3D CT) as an nnU-Net v2 plugin."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# nnU-Net >= 2.8 finds external trainers only through the folders listed in `nnUNet_extTrainer`. This .pth file
# runs at interpreter start-up and appends our trainer folder to that variable (keeping any user value), so stock
# `nnUNetv2_train ... -tr nnScreenerFinetuneTrainer` works in a fresh shell without manual set-up.
PTH_NAME = 'nnscreener_ext_trainer.pth'
PTH_LINE = 'import nnscreener.ext_trainer_path\n'


class BuildPyWithPth(build_py):
    """Places the start-up .pth file at the root of the wheel (= site-packages)."""

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), 'w') as f:
            f.write(PTH_LINE)
        if self.editable_mode:
            # editable wheels ship only what lands in the install folder (setuptools' editable_wheel sets it to the
            # unpacked wheel); build_lib is discarded there
            install_lib = self.get_finalized_command('install').install_lib
            with open(os.path.join(install_lib, PTH_NAME), 'w') as f:
                f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


setup(
    name='nnscreener',
    version='0.1.0',
    description='Screener for nnU-Net v2: unsupervised anomaly segmentation of all pathologies in 3D CT, '
                'distilled into an nnU-Net UNet for low-shot segmentation.',
    license='Apache-2.0',
    packages=find_packages(include=['nnscreener', 'nnscreener.*']),
    python_requires='>=3.10',
    install_requires=[
        'nnunetv2>=2.8',
        'torch>=2.1.2',
        'batchgenerators>=0.25.1',
        'dynamic-network-architectures>=0.4.4',
        'acvl-utils>=0.2.6',
        'SimpleITK>=2.2.1',
        'numpy>=1.24',
        'scipy',
        'scikit-learn',
        'scikit-image>=0.19.3',
        'matplotlib',
        'tqdm',
    ],
    extras_require={'test': ['pytest']},
    cmdclass={'build_py': BuildPyWithPth},
    entry_points={'console_scripts': [
        'nnScreener_make_phantoms = nnscreener.phantoms.make_phantoms:make_phantoms_entry',
        'nnScreener_plan_and_preprocess = nnscreener.preprocessing.plan_and_preprocess:plan_and_preprocess_entry',
        'nnScreener_pretrain = nnscreener.run.pretrain:pretrain_entry',
        'nnScreener_predict = nnscreener.inference.predict:predict_entry',
        'nnScreener_findings = nnscreener.inference.findings:findings_entry',
        'nnScreener_evaluate = nnscreener.evaluation.evaluate:evaluate_entry',
        'nnScreener_lowshot_splits = nnscreener.finetuning.lowshot_splits:lowshot_splits_entry',
        'nnScreener_compare = nnscreener.evaluation.compare:compare_entry',
        'nnScreener_demo = nnscreener.run.demo:demo_entry',
    ]},
)
