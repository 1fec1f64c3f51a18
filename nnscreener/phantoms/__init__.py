"""Synthetic torso CT phantoms with lesions, written as nnU-Net v2 raw datasets (see documentation/phantoms.md).

API: `make_phantoms.make_phantom_datasets` (both datasets), `generator.generate_phantom_case` (one case),
`montage.save_montage` (PNG overview). CLI: `nnScreener_make_phantoms`.
"""
