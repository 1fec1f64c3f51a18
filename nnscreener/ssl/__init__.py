"""Pure building blocks of Screener's dense self-supervised pretraining: crop pairs, colour jitter, block masking, losses."""
