"""Non-Screener anomaly models, written as baselines for the quality benchmark (benchmarks/quality): an
intensity-only density model (HU given position), a 3D convolutional autoencoder (reconstruction error) and the
training-free local contrast (|HU - local median|).

Each is a model of its own, selected one way: `nnScreener_predict --model <name>`; a trained one is trained in the
density stage's place by its trainer, `nnScreener_pretrain --stages density --density_trainer <trainer>`.
"""
# name -> the trainer that trains it (None: training-free)
BASELINE_TRAINERS = {
    'intensity': 'nnScreenerIntensityTrainer',
    'autoencoder': 'nnScreenerAutoencoderTrainer',
    'local_contrast': None,
}
