"""``StackedLSTM``, ``StackedGRU``, ``StackedRNN``: S recurrent layers (every option of ``nn.LSTM``/``GRU``/``RNN``:
layers, bidirectional, ``proj_size``, ``bias=False``, dropout, ``batch_first``, unbatched inputs, ``hx``), each
model with its own masks on every weight matrix, computed together.

Each weight is masked once per call (``masked_weight_for_op``: exact-zero gradients at pruned entries). Two
implementations give the same result up to rounding, chosen by measurement once per model shape, whatever the
number of models (``sparse_engine.ops.dispatch``, op ``"stacked_rnn"``; ``dispatch.pin`` fixes one):

* ``"fused"``: the recurrence written out with batched matrix products over the model axis: per layer and
  direction, the input projection of all time steps is one ``baddbmm`` over the S models, then each time
  step one ``baddbmm`` of the hidden state by the S recurrent weights and the gate arithmetic (the formulas
  of torch's cells). One graph for all models: what ``torch.compile`` uses (the loop over time unrolls);
* ``"materialized"``: torch's fused recurrent kernel (oneDNN on CPU, cuDNN on GPUs) once per model on its
  masked weights. These kernels take one set of weights, so this is S calls; on the CPU, where oneDNN's
  LSTM beats a recurrence of small batched products, it is what keeps a stacked LSTM as fast as the models
  one after another.

The measurement runs on copies, inside ``torch.random.fork_rng`` (``dispatch``): dropout draws while timing
do not move the RNG streams. Under ``torch.autocast`` the layer always runs torch's kernel per model, so it
casts as ``nn.LSTM``/``nn.GRU``/``nn.RNN`` do on that device (under ``torch.compile`` that is a graph break,
as for torch's own recurrent layers). Inputs carry the model axis first: ``(S, B, T, F)`` with ``batch_first``,
``(S, T, B, F)`` without, ``(S, T, F)`` unbatched; ``hx`` likewise ``(S, layers * directions, B, H)``.
``PackedSequence`` inputs have no stacked version.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn

from sparse_engine.ops import dispatch
from sparse_engine.stack.layers import StackedMaskedLayer


class _StackedRNNBase(StackedMaskedLayer):
    """S recurrent layers of one type and options (module docstring)."""

    _OP = "stacked_rnn"

    def __init__(self, modules):
        super().__init__(modules)
        rnn = modules[0]
        for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size"):
            setattr(self, attr, getattr(rnn, attr))
        self._flat_weights_names = list(rnn._flat_weights_names)
        self._masked_set = frozenset(self._masked_names)

    @classmethod
    def masked_weight_names(cls, module: nn.Module) -> tuple[str, ...]:
        return tuple(n for n in module._flat_weights_names if n.startswith("weight"))

    def _hidden(self, hx: Optional[Tensor], name: str, size: int, batch: int, batched: bool, like: Tensor) -> Tensor:
        """``hx`` (or zeros) as ``(S, layers * directions, B, size)``, checked."""
        s, n = self.num_models, self.num_layers * (2 if self.bidirectional else 1)
        expected = (s, n, batch, size) if batched else (s, n, size)
        if hx is None:
            return like.new_zeros((s, n, batch, size))
        if not isinstance(hx, Tensor) or tuple(hx.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected} (models, layers * directions, "
                             f"{'batch, ' if batched else ''}features), got {getattr(hx, 'shape', type(hx).__name__)}")
        autocast = torch.is_autocast_enabled(like.device.type)  # torch's kernel casts (nn.LSTM accepts any float)
        if (hx.dtype != like.dtype and not (autocast and hx.is_floating_point())) or hx.device != like.device:
            raise TypeError(f"{name}: expected dtype {like.dtype} on {like.device} (the input's), got {hx.dtype} on "
                            f"{hx.device}")
        return hx if batched else hx.unsqueeze(2)

    def forward(self, input: Tensor, hx=None):
        s = self.num_models
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError("input: a PackedSequence has no stacked version; pass padded (S, B, T, F) tensors")
        if not isinstance(input, Tensor) or input.dim() not in (3, 4) or input.shape[0] != s \
                or input.shape[-1] != self.input_size:
            layout = "B, T" if self.batch_first else "T, B"
            raise ValueError(f"input: expected shape ({s}, {layout}, {self.input_size}) or unbatched ({s}, T, "
                             f"{self.input_size}), the model axis first, got "
                             f"{getattr(input, 'shape', type(input).__name__)}")
        batched = input.dim() == 4
        x = input.transpose(1, 2) if batched and self.batch_first else input  # (S, T, B, F)
        if not batched:
            x = x.unsqueeze(2)
        batch = x.shape[2]
        h_size = self.proj_size or self.hidden_size
        lstm = self.mode == "LSTM"
        if lstm:
            if hx is not None and not (isinstance(hx, tuple) and len(hx) == 2):
                raise TypeError(f"hx: expected a tuple (h_0, c_0) for an LSTM, got {type(hx).__name__}")
            h0, c0 = (None, None) if hx is None else hx
            h0 = self._hidden(h0, "hx[0]", h_size, batch, batched, x)
            c0 = self._hidden(c0, "hx[1]", self.hidden_size, batch, batched, x)
        else:
            h0, c0 = self._hidden(hx, "hx", h_size, batch, batched, x), None
        names = self._flat_weights_names
        tensors = (x, h0, c0) + tuple(getattr(self, n) for n in names)
        # Under autocast, torch's own kernel per model: its cast policy (per op and device) is nn.LSTM's/GRU's
        # Keyed by one model's shapes, not the number of models: the models of a trial compute alike in
        # stacks of any size (a sweep resumes trials in stacks of other sizes; the two differ in the last bits).
        impl = "materialized" if torch.is_autocast_enabled(x.device.type) else dispatch.choose(
            self._OP, lambda i, ts: self._run(i, ts[0], ts[1], ts[2], ts[3:])[0], tensors,
            key_tensors=tuple(None if t is None else t[0] for t in tensors))
        out, h_n, c_n = self._run(impl, x, h0, c0, tensors[3:])
        output = out.transpose(1, 2) if batched and self.batch_first else out
        if not batched:
            output, h_n = output.squeeze(2), h_n.squeeze(2)
        if not lstm:
            return output, h_n
        return output, (h_n, c_n if batched else c_n.squeeze(2))

    def _run(self, impl: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], params: tuple):
        """``(output (S, T, B, D*H), h_n, c_n)`` of ``x (S, T, B, F)`` with the stacked Parameters ``params``
        (in ``_flat_weights_names`` order: the layer's own, or detached copies to time), masked here."""
        weights = {n: (self._masked_weight(n, p) if n in self._masked_set else p)
                   for n, p in zip(self._flat_weights_names, params)}
        if impl == "materialized":
            return self._per_model(x, h0, c0, weights)
        return self._recurrence(x, h0, c0, weights)

    def _per_model(self, x, h0, c0, weights):
        """Torch's fused recurrent kernel (oneDNN, cuDNN) once per model, on model k's masked weights."""
        fn = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}[self.mode]
        # unbind, not [k]: one backward node each (indexing would zero-fill a whole gradient per model)
        per_model = [t.unbind(0) for t in [weights[n] for n in self._flat_weights_names]]
        xs, h0s, c0s = x.unbind(0), h0.unbind(0), (None if c0 is None else c0.unbind(0))
        outs, hs, cs = [], [], []
        for k in range(self.num_models):
            res = fn(xs[k], h0s[k] if c0 is None else (h0s[k], c0s[k]), [w[k] for w in per_model], self.bias,
                     self.num_layers, float(self.dropout), self.training, self.bidirectional, False)
            outs.append(res[0])
            hs.append(res[1])
            if c0 is not None:
                cs.append(res[2])
        return torch.stack(outs), torch.stack(hs), (torch.stack(cs) if cs else None)

    def _recurrence(self, x, h0, c0, weights):
        """The recurrence written out with batched matrix products over the models (module docstring)."""
        directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                i = layer * directions + d
                out, h, c = self._direction(x, f"_l{layer}{'_reverse' if d else ''}", weights, h0[:, i],
                                            None if c0 is None else c0[:, i], reverse=d == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        return x, torch.stack(h_n, 1), (torch.stack(c_n, 1) if c0 is not None else None)

    def _direction(self, x: Tensor, suffix: str, weights: dict, h: Tensor, c: Optional[Tensor], reverse: bool):
        """One layer in one direction over ``x (S, T, B, F)``: ``(output (S, T, B, H), h_T, c_T)``."""
        s, steps, batch = x.shape[:3]
        w_ih = weights["weight_ih" + suffix]
        w_hh_t = weights["weight_hh" + suffix].transpose(1, 2)
        w_hr_t = weights["weight_hr" + suffix].transpose(1, 2) if self.proj_size else None
        b_ih = weights["bias_ih" + suffix] if self.bias else None
        b_hh = weights["bias_hh" + suffix] if self.bias else None
        gru = self.mode == "GRU"
        if b_ih is not None and not gru:  # the GRU's b_hh is inside its reset gate's product
            b_ih = b_ih + b_hh
        flat = x.reshape(s, steps * batch, x.shape[-1])
        xp = (torch.bmm(flat, w_ih.transpose(1, 2)) if b_ih is None
              else torch.baddbmm(b_ih.unsqueeze(1), flat, w_ih.transpose(1, 2))).view(s, steps, batch, -1)
        xp = xp.unbind(1)  # one backward node for all steps (indexing per step would zero-fill a full gradient each)
        outs = [None] * steps
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            if gru:
                gh = torch.bmm(h, w_hh_t) if b_hh is None else torch.baddbmm(b_hh.unsqueeze(1), h, w_hh_t)
                xr, xz, xn = xp[t].chunk(3, dim=-1)
                hr, hz, hn = gh.chunk(3, dim=-1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h = n + z * (h - n)
            elif self.mode == "LSTM":
                i, f, g, o = torch.baddbmm(xp[t], h, w_hh_t).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if w_hr_t is not None:
                    h = torch.bmm(h, w_hr_t)
            else:
                pre = torch.baddbmm(xp[t], h, w_hh_t)
                h = torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)
            outs[t] = h
        return torch.stack(outs, 1), h, c

    def extra_repr(self) -> str:
        return (f"num_models={self.num_models}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}")


class StackedLSTM(_StackedRNNBase):
    """S masked ``nn.LSTM`` layers (module docstring); returns ``output, (h_n, c_n)`` with the model axis first."""


class StackedGRU(_StackedRNNBase):
    """S masked ``nn.GRU`` layers (module docstring); returns ``output, h_n`` with the model axis first."""


class StackedRNN(_StackedRNNBase):
    """S masked ``nn.RNN`` layers, tanh or ReLU (module docstring); returns ``output, h_n``."""
