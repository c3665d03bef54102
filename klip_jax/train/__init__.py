"""Training: losses, train state and optimizer, the pure train step, and the driver loop."""
