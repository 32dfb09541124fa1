"""Pruning methods: pruners that change masks during training (after training, at initialisation,
lottery tickets, dynamic sparse training), their sparsity schedules, retraining LR schedules and
BatchNorm recalibration."""
from sparse_engine.pruning.methods.bn_recalibration import recalibrate_bn
from sparse_engine.pruning.methods.imp import IMP
from sparse_engine.pruning.methods.lr_schedules import (RETRAIN_SCHEDULES, ALLRSchedule, CLRSchedule, FTSchedule,
                                                        LLRSchedule, LRWSchedule, RetrainSchedule, SLRSchedule,
                                                        allr_initial_lr, relative_norm_drop, retrain_lr_schedule)
from sparse_engine.pruning.methods.pruner import Pruner, regrowth_scores
from sparse_engine.pruning.methods.pruners import FGGP, GMP, Cyclical, OneShot
from sparse_engine.pruning.methods.schedules import (RAMPS, cubic_sparsity, cycle_index, cycle_start,
                                                     cyclical_sparsity, imp_phase_rate, imp_phase_sparsities,
                                                     one_shot_sparsity)
# Pruning at initialisation, lottery tickets, dynamic sparse training (issue 12).
from sparse_engine.pruning.methods.drop_grow import (drop_and_grow_, drop_and_grow_masks, drop_and_grow_masks_ref,
                                                     drop_counts)
from sparse_engine.pruning.methods.dst import DECAYS, SET, DynamicSparse, RigL, drop_fraction_at
from sparse_engine.pruning.methods.lottery import load_ticket, make_ticket, snapshot
from sparse_engine.pruning.methods.pai import (LayerCollapseWarning, PruneAtInit, collapsed_layers, shuffled_mask,
                                               warn_layer_collapse)
from sparse_engine.pruning.methods.reinit import reinitialize_

__all__ = [
    "Pruner", "OneShot", "IMP", "GMP", "FGGP", "Cyclical", "regrowth_scores", "recalibrate_bn",
    "one_shot_sparsity", "imp_phase_rate", "imp_phase_sparsities", "cubic_sparsity", "cyclical_sparsity",
    "cycle_start", "cycle_index", "RAMPS",
    "retrain_lr_schedule", "RETRAIN_SCHEDULES", "RetrainSchedule", "FTSchedule", "LRWSchedule", "SLRSchedule",
    "CLRSchedule", "LLRSchedule", "ALLRSchedule", "relative_norm_drop", "allr_initial_lr",
    # pruning at initialisation, lottery tickets, dynamic sparse training
    "PruneAtInit", "LayerCollapseWarning", "collapsed_layers", "warn_layer_collapse", "shuffled_mask",
    "reinitialize_", "snapshot", "make_ticket", "load_ticket",
    "SET", "RigL", "DynamicSparse", "DECAYS", "drop_fraction_at",
    "drop_and_grow_", "drop_and_grow_masks", "drop_and_grow_masks_ref", "drop_counts",
]
