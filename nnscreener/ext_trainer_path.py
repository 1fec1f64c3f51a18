"""Registers nnscreener's trainer folder in `nnUNet_extTrainer` (imported at start-up by nnscreener_ext_trainer.pth).

Only `os` is imported here: this runs in every Python process of the environment.
"""
import os

TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'trainers')


def register(environ=os.environ) -> None:
    paths = [p for p in environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p]
    if TRAINER_FOLDER not in paths:
        environ['nnUNet_extTrainer'] = os.pathsep.join(paths + [TRAINER_FOLDER])


register()
