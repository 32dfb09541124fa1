"""Pruning: choosing masks for the sparse layers of a model.

``prune_`` combines a score (``scores``), a layer-wise allocation (``allocation``) and a
granularity (``granularity``); every mask is chosen through ``sparse_engine.ops.topk_mask``
(N:M through its local per-group rule).
"""
from sparse_engine.pruning.allocation import (ALLOCATIONS, Allocation, allocate, erk_densities, layer_densities,
                                              target_kept)
from sparse_engine.pruning.chita import (CHITA_SCHEDULES, CHITA_STEPS, chita, chita_backsolve, chita_objective,
                                         chita_plus_plus, chita_solve, chita_solve_blocks, chita_solve_ref,
                                         chita_sparsities)
from sparse_engine.pruning.granularity import GRANULARITIES, Granularity, check_nm, nm_mask, parse_granularity
from sparse_engine.pruning.bn_recalibration import recalibrate_bn
from sparse_engine.pruning.lr_schedules import (RETRAIN_SCHEDULES, ALLRSchedule, CLRSchedule, FTSchedule,
                                                LLRSchedule, LRWSchedule, RetrainSchedule, SLRSchedule,
                                                allr_initial_lr, relative_norm_drop, retrain_lr_schedule)
from sparse_engine.pruning.magnitude import global_magnitude_prune_
from sparse_engine.pruning.methods import FGGP, GMP, IMP, Cyclical, OneShot
from sparse_engine.pruning.obs import obs_layerwise, obs_prune_weight, obs_prune_weight_ref
from sparse_engine.pruning.prune import INPUTS, SCORE_INPUTS, prune_
from sparse_engine.pruning.pruner import Pruner, regrowth_scores
from sparse_engine.pruning.schedules import (RAMPS, cubic_sparsity, cycle_index, cycle_start, cyclical_sparsity,
                                             imp_phase_rate, imp_phase_sparsities, one_shot_sparsity)
from sparse_engine.pruning.scores import (SCORES, custom_scores, fggp_keep_scores, gradient_scores, grasp_scores,
                                          lamp_scores, lamp_transform, magnitude_scores, random_scores,
                                          saliency_scores, synflow_scores, wanda_scores)

__all__ = [
    "prune_", "global_magnitude_prune_", "Pruner", "OneShot", "IMP", "GMP", "FGGP", "Cyclical", "regrowth_scores",
    "recalibrate_bn", "chita", "chita_plus_plus", "chita_solve", "chita_solve_blocks", "chita_solve_ref",
    "chita_backsolve", "chita_objective", "chita_sparsities", "CHITA_SCHEDULES", "CHITA_STEPS", "obs_layerwise", "obs_prune_weight", "obs_prune_weight_ref", "SCORES", "SCORE_INPUTS", "INPUTS",
    "magnitude_scores", "gradient_scores", "saliency_scores", "grasp_scores", "synflow_scores", "wanda_scores",
    "lamp_scores", "lamp_transform", "random_scores", "custom_scores", "fggp_keep_scores",
    "ALLOCATIONS", "Allocation", "allocate", "layer_densities", "erk_densities", "target_kept",
    "GRANULARITIES", "Granularity", "parse_granularity", "nm_mask", "check_nm",
    "one_shot_sparsity", "imp_phase_rate", "imp_phase_sparsities", "cubic_sparsity", "cyclical_sparsity",
    "cycle_start", "cycle_index", "RAMPS",
    "retrain_lr_schedule", "RETRAIN_SCHEDULES", "RetrainSchedule", "FTSchedule", "LRWSchedule", "SLRSchedule",
    "CLRSchedule", "LLRSchedule", "ALLRSchedule", "relative_norm_drop", "allr_initial_lr",
]
