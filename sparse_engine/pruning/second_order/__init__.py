"""Second-order pruning: layer-wise OBS (SparseGPT) and CHITA/CHITA++ with their solver."""
from sparse_engine.pruning.second_order.chita import (CHITA_SCHEDULES, CHITA_STEPS, chita, chita_backsolve,
                                                      chita_objective, chita_plus_plus, chita_solve,
                                                      chita_solve_blocks, chita_solve_ref, chita_sparsities)
from sparse_engine.pruning.second_order.obs import obs_layerwise, obs_prune_weight, obs_prune_weight_ref

__all__ = [
    "chita", "chita_plus_plus", "chita_solve", "chita_solve_blocks", "chita_solve_ref", "chita_backsolve",
    "chita_objective", "chita_sparsities", "CHITA_SCHEDULES", "CHITA_STEPS",
    "obs_layerwise", "obs_prune_weight", "obs_prune_weight_ref",
]
