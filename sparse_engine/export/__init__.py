"""Export: ``torch.sparse`` inference modules (``to_sparse``) and safetensors checkpoints with masks."""
from sparse_engine.export.checkpoint import load_safetensors, save_safetensors
from sparse_engine.export.torch_sparse import (LAYOUTS, ExportedLayer, ExportReport, SparseTensorLinear, block_size_of,
                                               to_sparse)

__all__ = ["to_sparse", "SparseTensorLinear", "ExportReport", "ExportedLayer", "LAYOUTS", "block_size_of",
           "save_safetensors", "load_safetensors"]
