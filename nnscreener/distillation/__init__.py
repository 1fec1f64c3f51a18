"""Distillation of the modular Screener's anomaly map into the plans' UNet: its objective (pure torch)."""
