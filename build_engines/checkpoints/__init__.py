"""Random-weight checkpoints of real model families, in the layout of their downloads."""
