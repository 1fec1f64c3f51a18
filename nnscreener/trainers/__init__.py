"""nnU-Net trainers of nnscreener.

This folder is registered in `nnUNet_extTrainer`; nnU-Net imports each module here as a *top-level* module, so the
modules use absolute imports only and carry unique names (`nnscreener_*`).
"""
