"""The channels of a Screener cache volume and of the training crops cut from it (preprocessing/screener_cache.py
writes them): the stock nnU-Net input, its CLAHE and the body mask.

One place for the layout, so the data loaders (training/) and the pure-torch objectives beside their models
(density/, distillation/, baselines/) read the same channels without importing each other.
"""
import torch

STOCK, CLAHE, BODY = 0, 1, 2


def crop_channels(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, *patch) crops -> stock input, CLAHE and body mask, each (B, 1, *patch) (views of `data`)."""
    return data[:, STOCK:STOCK + 1], data[:, CLAHE:CLAHE + 1], data[:, BODY:BODY + 1]
