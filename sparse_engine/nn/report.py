"""``sparsity_report``: densities of the sparse layers, and of *every* weight of the model.

A model's "weights" here are its Parameters of rank >= 2 whose name does not start with
``bias`` (matrices, convolution kernels, embeddings, recurrent weights; not biases or norm
scales), each counted once when tied. The report gives the density over the sparse layers (what
pruning controls) and over all weights, where weights left dense count as kept, with the reason
each was left dense, so a model that is 90% sparse on a third of its weights does not read as
90% sparse.
"""
import warnings
from dataclasses import dataclass, field

from torch import nn

from sparse_engine.nn.conversion import dense_reason
from sparse_engine.nn.masked_module import check_model, sparse_modules


@dataclass
class LayerDensity:
    """A sparse layer (unit): its kept (unpruned) weights, and non-zeros left at pruned positions."""
    name: str
    shape: tuple
    numel: int
    kept: int
    pruned_nonzero: int = 0

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 1.0


@dataclass
class DenseWeight:
    """A weight Parameter left dense, and why."""
    name: str
    shape: tuple
    numel: int
    reason: str


def format_table(rows: list[tuple], head: tuple, right_from: int) -> list[str]:
    """Lines of a text table: a header, a rule, the rows; columns from ``right_from`` on right-aligned."""
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < right_from else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


@dataclass
class SparsityReport:
    """Per-layer and global density of a model's sparse layers, and of all its weights (``str()`` prints tables).

    ``numel``/``kept``/``density``/``sparsity`` are over the sparse layers; the ``all_*``
    properties are over every weight, dense ones counting as kept; ``coverage`` is the fraction
    of weight elements in sparse layers.
    """
    layers: list[LayerDensity]
    dense: list[DenseWeight] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def all_numel(self) -> int:
        return self.numel + sum(w.numel for w in self.dense)

    @property
    def all_density(self) -> float:
        total = self.all_numel
        return (self.kept + total - self.numel) / total if total else 1.0

    @property
    def all_sparsity(self) -> float:
        return 1.0 - self.all_density

    @property
    def coverage(self) -> float:
        return self.numel / self.all_numel if self.all_numel else 1.0

    def empty_layers(self) -> list[str]:
        """Names of the sparse layers with no kept weight."""
        return [layer.name for layer in self.layers if layer.numel and not layer.kept]

    def coverage_text(self) -> str:
        lines = [f"{self.numel} of {self.all_numel} weight elements ({100 * self.coverage:.1f}%) are in sparse layers"]
        lines += [f"  left dense: {w.name} {tuple(w.shape)}: {w.reason}" for w in self.dense]
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [(layer.name or "<model>", "x".join(map(str, layer.shape)), f"{layer.density:.4f}", str(layer.kept),
                 str(layer.numel)) for layer in self.layers]
        rows.append(("global", "sparse layers", f"{self.density:.4f}", str(self.kept), str(self.numel)))
        if self.dense:
            rows.append(("global", "all weights", f"{self.all_density:.4f}",
                         str(self.kept + self.all_numel - self.numel), str(self.all_numel)))
        lines = format_table(rows, ("layer", "shape", "density", "nonzeros", "weights"), right_from=2)
        if self.dense:
            lines += ["", f"left dense ({100 * (1 - self.coverage):.1f}% of weight elements):"]
            lines += format_table([(w.name, "x".join(map(str, w.shape)), w.reason) for w in self.dense],
                            ("weight", "shape", "reason"), right_from=3)
        return "\n".join(lines)


def is_weight(name: str, p) -> bool:
    """A Parameter counted as a weight: rank >= 2, not a bias."""
    return p.dim() >= 2 and not name.rpartition(".")[2].startswith("bias")


def _dense_weights(model: nn.Module, masked: set) -> list[DenseWeight]:
    modules = dict(model.named_modules())
    out, seen = [], set(masked)
    for mod_name, module in modules.items():
        parent_name, _, child = mod_name.rpartition(".")
        parent = modules.get(parent_name) if mod_name else None
        for pname, p in module._parameters.items():
            if p is None or id(p) in seen or not is_weight(pname, p):
                continue
            seen.add(id(p))
            name = f"{mod_name}.{pname}" if mod_name else pname
            out.append(DenseWeight(name, tuple(p.shape), p.numel(), dense_reason(module, pname, parent, child)))
    return out


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Name, shape, density and kept count of every sparse layer, the weights left dense with the
    reason, and the global densities (sparse layers, all weights).

    Warns when a layer holds non-zero weights at pruned positions (an optimizer moved them:
    ``mask_optimizer`` prevents it); outputs and ``state_dict()`` use the mask regardless.
    """
    check_model(model)
    layers = []
    units = sparse_modules(model)
    for name, unit in units:
        w = unit.weight
        if w.is_meta:
            raise ValueError(f"model: layer '{name}' is on the meta device (no values); load its weights first, "
                             f"e.g. model.load_state_dict(state_dict, assign=True)")
        mask = unit.mask
        layers.append(LayerDensity(name, tuple(w.shape), w.numel(), int(mask.sum()),
                                   int(w.detach().masked_fill(mask, 0).count_nonzero())))
    drifted = [f"{layer.name} ({layer.pruned_nonzero})" for layer in layers if layer.pruned_nonzero]
    if drifted:
        warnings.warn(f"sparsity_report: non-zero weights at pruned positions in {', '.join(drifted)}: an optimizer "
                      f"moved them (use sparse_engine.mask_optimizer(opt, model), or layer.apply_mask_()); outputs "
                      f"and state_dict() use the masks", stacklevel=2)
    return SparsityReport(layers, _dense_weights(model, {id(unit.weight) for _, unit in units}))


def weight_coverage(model: nn.Module) -> str:
    """Which weights are in sparse layers and which were left dense, with reasons (reads no masks)."""
    units = sparse_modules(model)
    layers = [LayerDensity(name, tuple(u.weight.shape), u.weight.numel(), u.weight.numel()) for name, u in units]
    return SparsityReport(layers, _dense_weights(model, {id(u.weight) for _, u in units})).coverage_text()
