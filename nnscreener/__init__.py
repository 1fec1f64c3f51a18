"""nnscreener: Screener for nnU-Net v2.

Kept import-light on purpose: `nnscreener.ext_trainer_path` is imported at every interpreter start-up.
"""
__version__ = '0.1.0'
