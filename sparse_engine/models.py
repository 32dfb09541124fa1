"""Reference models: the demos' Fashion-MNIST networks and the everyday architectures users prune.

One place for the models that the demos, sweeps, tests and benchmarks share, so that "the demo's
MLP" or "ResNet-18" means the same network everywhere. All are plain ``torch.nn`` models (dense);
``sparse_engine.sparsify`` makes them sparse.

====================  ==============================================  =========================
name                  what                                            input -> output
====================  ==============================================  =========================
``fashion_mlp``       MLP 784-300-100-10 (the demo's)                 (B, 1, 28, 28) -> (B, 10)
``fashion_cnn``       2 conv + BatchNorm, 2 FC (the demo's)           (B, 1, 28, 28) -> (B, 10)
``second_order_mlp``  MLP 784-40-20-10, no biases (WoodFisher/CHITA)  (B, 1, 28, 28) -> (B, 10)
``resnet18``          ResNet-18, CIFAR stem (3x3 conv, no max-pool)   (B, 3, 32, 32) -> (B, 10)
``transformer``       2-layer pre-norm encoder, mean-pooled           (B, T) int64 -> (B, 10)
``lstm``              embedding, 2-layer LSTM, linear head            (B, T) int64 -> (B, 10)
``tied_lm``           embedding, GRU, output tied to the embedding    (B, T) int64 -> (B, T, V)
``conv_zoo``          Conv1d/ConvTranspose1d, depthwise and pointwise (B, 1, 28, 28) -> (B, 10)
                      Conv2d, ConvTranspose2d, Conv3d
====================  ==============================================  =========================

``build_model(name, **options)`` builds one by name; ``example_batch(name, batch_size)`` gives a
random batch of the right shapes and dtypes (for unit tests and benchmarks, not for training).
"""
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def fashion_mlp(num_classes: int = 10) -> nn.Module:
    """MLP 784-300-100-10 with ReLU (the demo's MLP)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, num_classes))


def fashion_cnn(num_classes: int = 10) -> nn.Module:
    """Two 3x3 conv + BatchNorm + max-pool blocks (8, 16 channels), then FC 784-64-10 (the demo's CNN)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes))


def second_order_mlp(num_classes: int = 10) -> nn.Module:
    """784-40-20-10, no biases, ReLU (the MLP of the WoodFisher and CHITA MNIST experiments)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 40, bias=False), nn.ReLU(), nn.Linear(40, 20, bias=False),
                         nn.ReLU(), nn.Linear(20, num_classes, bias=False))


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block; a 1x1 conv + BatchNorm shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) with the CIFAR stem: 3x3 conv, no max-pool; 11.2 M parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)]
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet18(num_classes, in_channels)


class LearnedPositions(nn.Module):
    """Learned position embeddings added to ``x (..., T, D)``: ``x + weight[:T]`` (a leaf layer with its own
    Parameter: left dense by ``sparsify``, stacked by ``sparse_engine.stack`` with vmap)."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight[:x.shape[-2]]


class TransformerClassifier(nn.Module):
    """Token embedding + learned positions, pre-norm ``nn.TransformerEncoder``, mean pool, linear head. Its
    forward indexes from the end (time is dim -2), so it also runs on a stack's ``(K, B, T)`` tokens."""

    def __init__(self, vocab_size: int = 1000, d_model: int = 128, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 256, max_len: int = 128, num_classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = LearnedPositions(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                           norm_first=True)
        # No nested-tensor fast path: it is for padded inference and bypasses the layers' forward.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        self.register_load_state_dict_pre_hook(_positions_key)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.pos(self.embed(tokens))
        return self.head(self.norm(self.encoder(x)).mean(dim=-2))


def _positions_key(module, state_dict, prefix, *args) -> None:
    """Checkpoints of earlier versions hold the positions as ``pos`` (a bare Parameter), now ``pos.weight``."""
    if prefix + "pos" in state_dict and prefix + "pos.weight" not in state_dict:
        state_dict[prefix + "pos.weight"] = state_dict.pop(prefix + "pos")


def transformer(vocab_size: int = 1000, d_model: int = 128, nhead: int = 4, num_layers: int = 2,
                dim_feedforward: int = 256, max_len: int = 128, num_classes: int = 10) -> nn.Module:
    return TransformerClassifier(vocab_size, d_model, nhead, num_layers, dim_feedforward, max_len, num_classes)


class LSTMClassifier(nn.Module):
    """Token embedding, multi-layer LSTM, linear head on the last time step. Its forward indexes time from the
    end (dim -2), so it also runs on a stack's ``(K, B, T)`` tokens (``sparse_engine.stack``)."""

    def __init__(self, vocab_size: int = 1000, embed_dim: int = 64, hidden_size: int = 128, num_layers: int = 2,
                 num_classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[..., -1, :])


def lstm(vocab_size: int = 1000, embed_dim: int = 64, hidden_size: int = 128, num_layers: int = 2,
         num_classes: int = 10) -> nn.Module:
    return LSTMClassifier(vocab_size, embed_dim, hidden_size, num_layers, num_classes)


class TiedLM(nn.Module):
    """Language model whose output projection shares its weight with the input embedding
    (Press & Wolf 2017): one ``Parameter`` in two layers."""

    def __init__(self, vocab_size: int = 1000, dim: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.decoder = nn.Linear(dim, vocab_size)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.decoder(out)


def tied_lm(vocab_size: int = 1000, dim: int = 128) -> nn.Module:
    return TiedLM(vocab_size, dim)


class ConvZoo(nn.Module):
    """Every convolution type in one small network on a Fashion-MNIST-shaped input."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 8, 9, stride=4, padding=4)                  # (B, 1, 784) -> (B, 8, 196)
        self.up1d = nn.ConvTranspose1d(8, 8, 4, stride=4)                     # -> (B, 8, 784)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)              # (B, 8, 28, 28)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.up2d = nn.ConvTranspose2d(16, 8, 2, stride=2)                    # -> (B, 8, 56, 56)
        self.conv3d = nn.Conv3d(1, 4, 3, stride=2, padding=1)                 # (B, 1, 8, 14, 14) -> (B, 4, 4, 7, 7)
        self.head = nn.Linear(4 * 4 * 7 * 7, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = torch.relu(self.up1d(torch.relu(self.conv1d(x.reshape(b, 1, 784)))))
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(x.reshape(b, 8, 28, 28)))))
        x = nn.functional.max_pool2d(torch.relu(self.up2d(x)), 4)             # (B, 8, 14, 14)
        x = torch.relu(self.conv3d(x.unsqueeze(1)))
        return self.head(x.flatten(1))


def conv_zoo(num_classes: int = 10) -> nn.Module:
    return ConvZoo(num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "fashion_mlp": fashion_mlp, "fashion_cnn": fashion_cnn, "second_order_mlp": second_order_mlp,
    "resnet18": resnet18, "transformer": transformer, "lstm": lstm, "tied_lm": tied_lm, "conv_zoo": conv_zoo,
}

# name -> (input kind, per-example input shape); token models take (B, T) int64 below vocab_size.
_INPUTS = {
    "fashion_mlp": ("image", (1, 28, 28)), "fashion_cnn": ("image", (1, 28, 28)),
    "second_order_mlp": ("image", (1, 28, 28)), "conv_zoo": ("image", (1, 28, 28)),
    "resnet18": ("image", (3, 32, 32)),
    "transformer": ("tokens", (32,)), "lstm": ("tokens", (32,)), "tied_lm": ("tokens", (32,)),
}


def build_model(name: str, **options) -> nn.Module:
    """The model called ``name`` (a key of ``MODELS``), built with ``options`` (its builder's arguments)."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"name: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**options)


def example_batch(name: str, batch_size: int = 8, generator: Optional[torch.Generator] = None,
                  vocab_size: int = 1000, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """A random ``(inputs, targets)`` batch for model ``name`` built with default options.

    For unit tests and benchmarks only: images are standard normal, tokens uniform below
    ``vocab_size``; targets are class indices (``tied_lm``: next tokens, shape (B, T)).
    """
    if not isinstance(name, str) or name not in _INPUTS:
        raise ValueError(f"name: expected one of {sorted(_INPUTS)}, got {name!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    kind, shape = _INPUTS[name]
    if kind == "image":
        x = torch.randn(batch_size, *shape, generator=generator)
    else:
        x = torch.randint(0, vocab_size, (batch_size, *shape), generator=generator)
    if name == "tied_lm":
        y = torch.randint(0, vocab_size, (batch_size, *shape), generator=generator)
    else:
        y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return x, y
