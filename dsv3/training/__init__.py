"""The training system: the runner, the pure steps, losses, optimizer, checkpoints, EMA, metrics, workdir, config."""
