"""Selection: everything that chooses a mask. Scores, layer-wise allocation, granularity, ``prune_``."""
from sparse_engine.pruning.select.allocation import (ALLOCATIONS, Allocation, allocate, erk_densities,
                                                     layer_densities, target_kept)
from sparse_engine.pruning.select.granularity import (GRANULARITIES, Granularity, check_nm, nm_mask,
                                                      parse_granularity)
from sparse_engine.pruning.select.magnitude import global_magnitude_prune_
from sparse_engine.pruning.select.prune import INPUTS, SCORE_INPUTS, prunable_layers, prune_
from sparse_engine.pruning.select.restore import ModelSnapshot, restore_on_error, restores_on_error
from sparse_engine.pruning.select.scores import (SCORES, custom_scores, fggp_keep_scores, gradient_scores,
                                                 grasp_scores, lamp_scores, lamp_transform, magnitude_scores,
                                                 random_scores, saliency_scores, synflow_scores, wanda_scores)
from sparse_engine.pruning.select.scores import buffers_restored, calib_inputs, forward_with

__all__ = [
    "prune_", "global_magnitude_prune_", "SCORES", "SCORE_INPUTS", "INPUTS",
    "magnitude_scores", "gradient_scores", "saliency_scores", "grasp_scores", "synflow_scores", "wanda_scores",
    "lamp_scores", "lamp_transform", "random_scores", "custom_scores", "fggp_keep_scores",
    "ALLOCATIONS", "Allocation", "allocate", "layer_densities", "erk_densities", "target_kept",
    "GRANULARITIES", "Granularity", "parse_granularity", "nm_mask", "check_nm",
    "restore_on_error", "ModelSnapshot",
    # helpers the other pruning packages use
    "prunable_layers", "buffers_restored", "calib_inputs", "forward_with", "restores_on_error",
]
