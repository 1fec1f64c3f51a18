"""Non-Screener anomaly models, written as baselines for the quality benchmark (benchmarks/quality): an
intensity-only density model (HU given position), a 3D convolutional autoencoder (reconstruction error) and the
training-free local contrast (|HU - local median|)."""
