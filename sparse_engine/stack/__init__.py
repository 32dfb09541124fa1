"""Model stacking: K pruning runs of one architecture trained as one batched model, each with its own masks.

**Mechanism: per-layer stacked modules.** ``stack(models)`` replaces every layer of a copy of the
models' module tree by a stacked layer holding all K models' tensors with a leading model axis
(``weight (K, *shape)``, ``mask_bits (K, rows, words)``, BatchNorm's ``running_mean (K, C)``) and
computing all K models in one call: the stacked masked ops (``stacked_masked_linear``: one
batched GEMM or one Triton launch over K; ``stacked_masked_conv2d``: one grouped convolution on CPU, one
Triton launch over K on CUDA),
BatchNorm as one ``F.batch_norm`` over the K models' channels side by side. We chose this over
``torch.func.stack_module_state`` + ``vmap`` because:

* BatchNorm's in-place running statistics break under ``vmap`` (functorch#505, #867, pytorch#85533);
  a stacked BatchNorm updates per-model running statistics with ordinary in-place ops.
* ``vmap`` over this library's custom ops would need batching rules that either loop over the
  models (K launches, the overhead stacking exists to remove) or call a batched kernel: the stacked
  ops here are those kernels, called directly.
* The stacked model is an ordinary ``nn.Module`` with ordinary Parameters: optimizers, state_dict,
  ``torch.compile(fullgraph=True)`` and checkpoints work unchanged, and per-model optimisation and
  pruning (``sparse_engine.stack.optim``, ``sparse_engine.stack.pruning``) read the model axis.

Containers (``nn.Sequential``, a user's residual block) are kept and run their own ``forward`` on
``(K, B, ...)`` tensors: element-wise code (``torch.relu(out + shortcut(x))``) works as written.
A container whose ``forward`` calls functions that assume the batch is dimension 0
(``torch.flatten(x, 1)``, ``F.adaptive_avg_pool2d``) needs those as modules (``nn.Flatten``,
``nn.AdaptiveAvgPool2d``), which are stacked. Stacked layers with parameters: Linear, Conv1d (the
stacked conv2d on height-1 views), Conv2d, Conv3d and ConvTranspose1d/2d/3d (one grouped
convolution), Bilinear (one ``einsum``), Embedding (one lookup in the K masked tables), LSTM/GRU/RNN
(the recurrence written out with batched matrix products over the models, ``stack.recurrent``),
MultiheadAttention (the stacked masked projections, the attention with the models folded into the
batch, ``stack.attention``; ``nn.TransformerEncoderLayer`` runs its own forward on it), BatchNorm,
LayerNorm. Any other leaf layer with Parameters and no buffers (GroupNorm, PReLU, a user's layer with its
own Parameters and ``forward``, such as learned positions) runs its own ``forward`` once per model under
``torch.func.vmap`` (``StackedVmap``). Layers with Parameters that have none of these (a layer with
buffers updated in place, a module with children and Parameters of its own) are refused by name. A
stacked layer may mask several weights (an LSTM's
``weight_ih_l0``, ``weight_hh_l0``, ...): ``StackedModel.masked_units`` lists one unit per masked
Parameter, named as ``sparse_modules`` names the unstacked models' units.
"""
from sparse_engine.ops.stacked_mask import pack_stacked_mask, unpack_stacked_mask
from sparse_engine.ops.stacked_masked_conv2d import stacked_masked_conv2d, stacked_masked_conv2d_ref
from sparse_engine.ops.stacked_masked_linear import stacked_masked_linear, stacked_masked_linear_ref
from sparse_engine.stack.attention import StackedMultiheadAttention
from sparse_engine.stack.convert import StackedModel, stack, unstack
from sparse_engine.stack.layers import (PerSample, StackedBatchNorm, StackedBilinear, StackedConv1d, StackedConv2d,
                                        StackedConv3d, StackedConvTranspose1d, StackedConvTranspose2d,
                                        StackedConvTranspose3d, StackedEmbedding, StackedLayerNorm, StackedLinear,
                                        StackedMaskedLayer, StackedVmap)
from sparse_engine.stack.recurrent import StackedGRU, StackedLSTM, StackedRNN

__all__ = ["stack", "unstack", "StackedModel", "StackedLinear", "StackedConv1d", "StackedConv2d", "StackedConv3d",
           "StackedConvTranspose1d", "StackedConvTranspose2d", "StackedConvTranspose3d", "StackedBilinear",
           "StackedEmbedding", "StackedLSTM", "StackedGRU", "StackedRNN", "StackedMultiheadAttention",
           "StackedBatchNorm", "StackedLayerNorm", "StackedMaskedLayer", "StackedVmap", "PerSample",
           "stacked_masked_linear", "stacked_masked_linear_ref", "stacked_masked_conv2d", "stacked_masked_conv2d_ref",
           "pack_stacked_mask", "unpack_stacked_mask"]
