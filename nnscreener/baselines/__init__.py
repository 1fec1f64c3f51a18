"""Non-Screener anomaly models, written as baselines for the quality benchmark (benchmarks/quality): an
intensity-only density model (HU given position) and a 3D convolutional autoencoder (reconstruction error)."""
