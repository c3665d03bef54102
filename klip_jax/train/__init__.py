"""Training: losses, train state and optimizer, the pure train and relabel steps, SCIO stages,
checkpoints, metrics logs and the loop."""
