"""The run machinery every strategy shares: the training loop, checkpoints, metrics, launch checks and flags."""
