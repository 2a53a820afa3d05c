"""Train/evaluate loops, checkpoints, metrics and run folders shared by every method."""
