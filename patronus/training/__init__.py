"""Training: the Lightning system, its callbacks, and fitting the activation prior."""
