"""Pruning: choosing masks for the sparse layers of a model."""
from sparse_engine.pruning.magnitude import global_magnitude_prune_

__all__ = ["global_magnitude_prune_"]
