"""``to_sparse``: a pruned model for inference with ``torch.sparse`` weights, and its memory against dense.

Layouts (``layout=``):

* ``"csr"``: each sparse linear layer becomes a :class:`SparseTensorLinear` holding its masked
  weight as a ``torch.sparse_csr`` tensor (int32 indices); ``F.linear`` runs torch's sparse
  matmul (MKL on CPU, cuSPARSE on CUDA). On CPU torch supports float32/float64 only.
* ``"bsr"``: the same with ``torch.sparse_bsr`` blocks. ``blocksize=None`` takes the block size
  from the mask's structure: the largest square ``B`` in 64, 32, ..., 2 for which every ``BxB``
  block is all kept or all pruned (``prune_(..., granularity="BxB")`` makes such masks); an error
  if there is none. A given ``blocksize`` (int or ``(rows, cols)``) stores every block holding a
  kept weight, zeros included.
* ``"semi_structured"``: 2:4 semi-structured sparsity through
  ``torch.sparse.to_sparse_semi_structured`` (CUDA tensor cores, fp16/bf16; masks from
  ``granularity="2:4"``). torch supports it on CUDA only: on CPU it is an error.
* ``"dense"``: ``densify`` (plain torch layers, pruned weights exact zeros).

Only linear layers (``SparseLinear`` and its subclasses) become sparse-tensor modules; every other
sparse layer (convolutions, embeddings, recurrent, attention, and linears whose weight another
layer reads or shares) is densified, and the report says so. The conversion is in place, like
``densify``; the exported model is for inference (no gradients through sparse weights).
Everything is checked before anything is converted: on an error the model is unchanged.
"""
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule, check_model
from sparse_engine.nn.report import format_table
from sparse_engine.nn.sparse_linear import SparseLinear
from sparse_engine.nn.sparsify import densify

LAYOUTS = ("csr", "bsr", "semi_structured", "dense")
_BLOCK_CANDIDATES = (64, 32, 16, 8, 4, 2)
_CPU_SPARSE_DTYPES = (torch.float32, torch.float64)


class SparseTensorLinear(nn.Module):
    """Inference ``nn.Linear`` whose ``weight`` buffer is a sparse tensor (CSR, BSR or 2:4 semi-structured).

    ``x (..., in_features) -> (..., out_features)``, ``F.linear(x, weight, bias)``.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], layout: str):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.layout = layout
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout!r}"


@dataclass
class ExportedLayer:
    name: str
    layout: str
    shape: tuple
    bytes: int
    dense_bytes: int


@dataclass
class ExportReport:
    """Weight memory of each exported layer against its dense weight (``str()`` prints a table)."""
    layers: list[ExportedLayer]

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    def __str__(self) -> str:
        rows = [(layer.name or "<model>", layer.layout, "x".join(map(str, layer.shape)), str(layer.bytes),
                 str(layer.dense_bytes), f"{layer.bytes / max(layer.dense_bytes, 1):.3f}") for layer in self.layers]
        rows.append(("total", "", "", str(self.bytes), str(self.dense_bytes),
                     f"{self.bytes / max(self.dense_bytes, 1):.3f}"))
        return "\n".join(format_table(rows, ("layer", "layout", "shape", "bytes", "dense bytes", "ratio"),
                                       right_from=3))


def tensor_bytes(t: Tensor) -> int:
    """Bytes held by a dense, CSR, BSR or semi-structured tensor (values and indices)."""
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return sum(x.numel() * x.element_size() for x in (t.values(), t.crow_indices(), t.col_indices()))
    if t.layout == torch.strided and type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # tensor subclasses (semi-structured): their inner tensors
        return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), Tensor))
    return t.numel() * t.element_size()


def block_size_of(mask: Tensor) -> Optional[int]:
    """The largest ``B`` in 64, 32, ..., 2 for which every ``BxB`` block of a 2-D mask is all kept or all pruned."""
    rows, cols = mask.shape
    for b in _BLOCK_CANDIDATES:
        if rows % b or cols % b:
            continue
        blocks = mask.reshape(rows // b, b, cols // b, b)
        if torch.equal(blocks.any(dim=(1, 3)), blocks.all(dim=(1, 3))):
            return b
    return None


def _is_2_4(mask: Tensor) -> bool:
    rows, cols = mask.shape
    return cols % 4 == 0 and bool((mask.reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def _blocksize(blocksize) -> Optional[tuple[int, int]]:
    if blocksize is None:
        return None
    if isinstance(blocksize, int) and not isinstance(blocksize, bool):
        blocksize = (blocksize, blocksize)
    if (not isinstance(blocksize, (tuple, list)) or len(blocksize) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocksize)):
        raise ValueError(f"blocksize: expected None, a positive int or a pair of positive ints, got {blocksize!r}")
    return tuple(blocksize)


def _exportable_linears(model: nn.Module) -> dict[str, SparseLinear]:
    """Sparse linears that can become SparseTensorLinear: called through their own forward, weight not shared."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    return {name: m for name, m in model.named_modules()
            if isinstance(m, SparseLinear) and m.input_kind == "linear" and holders[id(m.weight)] == 1}


def _sparse_weight(name: str, layer: SparseLinear, layout: str, blocksize) -> Tensor:
    """The masked weight of ``layer`` in ``layout``; raises with the layer's name if it cannot be."""
    w, mask = layer.weight.detach(), layer.mask
    masked = w.masked_fill(~mask, 0)
    if layout == "semi_structured":
        if w.device.type != "cuda":
            raise ValueError(f"layout 'semi_structured': torch's 2:4 semi-structured kernels run on CUDA only; layer "
                             f"'{name}' is on {w.device} (move the model to a GPU first)")
        if not _is_2_4(mask):
            raise ValueError(f"layout 'semi_structured': layer '{name}' is not 2:4 sparse along its input dimension "
                             f"(prune with granularity='2:4')")
        return torch.sparse.to_sparse_semi_structured(masked)
    if w.device.type == "cpu" and w.dtype not in _CPU_SPARSE_DTYPES:
        raise ValueError(f"layout '{layout}': torch's sparse matmul on CPU supports {_CPU_SPARSE_DTYPES}; layer "
                         f"'{name}' is {w.dtype} (convert the model with .float() first, or export on a GPU)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR|BSC|CSC) tensor support is in beta.*")
        if layout == "csr":
            t = masked.to_sparse_csr()
            return torch.sparse_csr_tensor(t.crow_indices().int(), t.col_indices().int(), t.values(), t.shape,
                                           check_invariants=False)
        block = blocksize
        if block is None:
            b = block_size_of(mask)
            if b is None:
                raise ValueError(f"layout 'bsr': layer '{name}' has no square block structure (every BxB block all "
                                 f"kept or all pruned, B in {_BLOCK_CANDIDATES}); pass blocksize=(rows, cols) to "
                                 f"store the blocks holding kept weights, or use layout='csr'")
            block = (b, b)
        if w.shape[0] % block[0] or w.shape[1] % block[1]:
            raise ValueError(f"blocksize: {block} does not divide layer '{name}' of shape {tuple(w.shape)}")
        t = masked.to_sparse_bsr(block)
        return torch.sparse_bsr_tensor(t.crow_indices().int(), t.col_indices().int(), t.values(), t.shape,
                                           check_invariants=False)


@torch.no_grad()
def to_sparse(model: nn.Module, layout: str = "csr", *, blocksize: Union[None, int, tuple] = None) -> ExportReport:
    """Convert ``model``'s sparse layers in place for inference in ``layout`` (module docstring).

    Args:
        model: a model with sparse layers (``sparse_engine.sparsify``).
        layout: ``"csr"``, ``"bsr"``, ``"semi_structured"`` or ``"dense"``.
        blocksize: BSR block size; None derives it from each mask's structure.
    Returns:
        an :class:`ExportReport`: per exported layer its layout and the bytes of its weight
        (values and indices) against the dense weight.
    """
    check_model(model)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    blocksize = _blocksize(blocksize)
    if blocksize is not None and layout != "bsr":
        raise ValueError(f"blocksize: only used with layout='bsr', got layout={layout!r}")
    if not any(isinstance(m, MaskedModule) for m in model.modules()):
        raise ValueError("model: expected a model with sparse layers (call sparse_engine.sparsify first), found none")
    linears = {} if layout == "dense" else _exportable_linears(model)
    if "" in linears:
        raise ValueError("model: a bare SparseLinear cannot be replaced in place; wrap it (nn.Sequential(layer))")
    weights = {name: _sparse_weight(name, layer, layout, blocksize) for name, layer in linears.items()}
    report = []
    for name, layer in linears.items():
        dense_bytes = layer.weight.numel() * layer.weight.element_size()
        report.append(ExportedLayer(name, layout, tuple(layer.weight.shape), tensor_bytes(weights[name]), dense_bytes))
        exported = SparseTensorLinear(weights[name], layer.bias, layout)
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, exported)
    for name, module in model.named_modules():
        if isinstance(module, MaskedModule):
            for n in module.owned_masked_weights():
                w = getattr(module, n)
                qual = f"{name}.{n}" if name else n
                report.append(ExportedLayer(qual, "dense", tuple(w.shape), w.numel() * w.element_size(),
                                            w.numel() * w.element_size()))
    densify(model)
    return ExportReport(report)
