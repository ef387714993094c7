"""RAD through time: ReLU RNNs (IRNN) and LSTMs whose weight gradients use RAD sketches.

A recurrent layer computes, for t = 0..T-1, pre-activations z_t = W_ih x_t + W_hh h_{t-1} + b.
The weight gradients are sums over time of outer products,

    dW_ih = sum_t dz_t^T x_t,    dW_hh = sum_t dz_t^T h_{t-1},

so, as for a Linear layer (functional.py), storing unbiased sketches x_hat_t, h_hat_{t-1}
(E[x_hat] = x) keeps them unbiased. The recurrent backward signal is exact:

- ReLU RNN, h_t = relu(z_t): dz_t = (dh_t) * 1[z_t > 0] and dh_{t-1} += dz_t W_hh, which needs
  only the 1-bit masks 1[h_t > 0] (methods/masks.py), so the hidden-state sequence is never
  stored, only its sketches (a fraction p of it) and T*B*H bits.
- LSTM (gate order i, f, g, o as in torch): c_t = f c_{t-1} + i g, h_t = o tanh(c_t). The gate
  derivatives need the gate activations and the cell states, which are stored exactly (5H per
  step); h_{t-1} enters only through W_hh h_{t-1}, so it is stored as a sketch.

All steps are sketched in one call, as the T*B rows of one Linear input (one draw per kind,
seed derive_seed(layer_seed, kind); kind 0: input, 1: hidden), the layer seed coming from the
converted module's seed stream; the weight gradient is then one :func:`linear_weight_grad` over
the T*B rows (a GEMM per chunk of rows, as for a Linear layer) instead of one per step. As for a
Linear input, ``same_sample`` shares one pattern across all rows: the batch and the steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from randprop.config import register_layers
from randprop.methods import kbit
from randprop.methods.base import RandomizedLayer, autocast_inputs, method_config
from randprop.methods.masks import pack_bits, unpack_bits
from randprop.methods.rad.config import RAD
from randprop.methods.rad.functional import compress, linear_weight_grad
from randprop.random import derive_seed

_INPUT, _HIDDEN = 0, 1


def _sketch_sequence(rows: torch.Tensor | None, cfg: RAD, seed: int, kind: int):
    """The RAD sketch of every step of the (S, B, n) ``rows`` at once, as S*B rows of one
    Linear input, in ``cfg.bits``: (the tensors to save, their kbit meta); ((None,), None)
    for None or no steps."""
    if rows is None or rows.shape[0] == 0:
        return (None,), None
    s = derive_seed(seed, kind)
    return kbit.pack(compress(rows.reshape(-1, 1, rows.shape[-1]), cfg, s), cfg.bits, cfg.group, s)


def _weight_grad(grad_z: torch.Tensor, stored, n: int, cfg: RAD, seed: int, kind: int, first: int):
    """sum_{t >= first} dz_t^T x_hat_t: one :func:`linear_weight_grad` over the rows of all
    the sketched steps (zero when none is)."""
    if stored is None:
        return grad_z.new_zeros(grad_z.shape[-1], n)
    d = grad_z[first:].reshape(-1, grad_z.shape[-1])
    return linear_weight_grad(d, stored, n, cfg, derive_seed(seed, kind))


def _input_part(x: torch.Tensor, w_ih: torch.Tensor, b_ih, b_hh) -> torch.Tensor:
    """W_ih x_t + b_ih + b_hh for every step at once: the pre-activations' input part."""
    pre = F.linear(x, w_ih, b_ih)
    if b_hh is not None:
        pre = pre + b_hh
    return pre


def _sketch_inputs(ctx, x, h0, out, b_ih, b_hh, cfg: RAD, seed: int, w_ih_index: int):
    """Sketches of x_t and h_{t-1} for dW_ih and dW_hh (the Function's inputs ``w_ih_index``
    and the next, then b_ih, b_hh), each only when its weight needs a gradient; what
    :func:`_parameter_grads` needs besides goes to ctx.layer. h_{t-1} starts at step 1 when h0
    is None: a zero initial state adds nothing to dW_hh."""
    need_ih, need_hh = ctx.needs_input_grad[w_ih_index : w_ih_index + 2]
    xs, x_meta = _sketch_sequence(x if need_ih else None, cfg, seed, _INPUT)
    first = 0 if h0 is not None else 1
    prev = out[:-1] if h0 is None else torch.cat([h0.unsqueeze(0), out[:-1]])
    hs, h_meta = _sketch_sequence(prev if need_hh else None, cfg, seed, _HIDDEN)
    ctx.layer = (cfg, seed, len(xs), first, w_ih_index, b_ih is not None, b_hh is not None)
    ctx.layouts = (x_meta, h_meta)
    return xs, hs


def _parameter_grads(ctx, grad_z: torch.Tensor, sketches, w_ih: torch.Tensor, w_hh: torch.Tensor):
    """From dz_t of every step: (dx, dW_ih, dW_hh, db_ih, db_hh), the weights' from the sketches
    of :func:`_sketch_inputs`, the rest exact (db_ih = db_hh = sum_t dz_t); None where not
    needed."""
    cfg, seed, n_xs, first, w, has_b_ih, has_b_hh = ctx.layer
    xs = kbit.unpack(sketches[:n_xs], ctx.layouts[0])
    hs = kbit.unpack(sketches[n_xs:], ctx.layouts[1])
    need = ctx.needs_input_grad
    grad_x = grad_z @ w_ih if need[0] else None
    grad_w_ih = grad_w_hh = None
    if need[w]:
        grad_w_ih = _weight_grad(grad_z, xs, w_ih.shape[1], cfg, seed, _INPUT, 0)
    if need[w + 1]:
        grad_w_hh = _weight_grad(grad_z, hs, w_hh.shape[1], cfg, seed, _HIDDEN, first)
    grad_b = grad_z.sum((0, 1)) if has_b_ih or has_b_hh else None
    return (
        grad_x,
        grad_w_ih,
        grad_w_hh,
        grad_b if has_b_ih and need[w + 2] else None,
        grad_b if has_b_hh and need[w + 3] else None,
    )


class _ReLURNNFn(torch.autograd.Function):
    """One ReLU RNN layer over a (T, B, n) sequence; returns the (T, B, H) hidden states."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, cfg: RAD, seed: int):
        steps, batch, _ = x.shape
        pre = _input_part(x, w_ih, b_ih, b_hh)
        h = x.new_zeros(batch, w_hh.shape[0]) if h0 is None else h0
        out = pre  # a fresh tensor: the hidden states overwrite it step by step, in place
        for t in range(steps):
            h = out[t].addmm_(h, w_hh.T).clamp_min_(0)
        xs, hs = _sketch_inputs(ctx, x, h0, out, b_ih, b_hh, cfg, seed, 2)
        ctx.save_for_backward(w_ih, w_hh, pack_bits(out > 0), *xs, *hs)
        ctx.shape = out.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        shape = ctx.shape
        w_ih, w_hh, packed, *sketches = ctx.saved_tensors
        dead = ~unpack_bits(packed, shape)
        # dz_t = (grad_out_t + dz_{t+1} W_hh) * 1[h_t > 0], in place in a copy of grad_out
        grad_z = grad_out.clone(memory_format=torch.contiguous_format)
        for t in reversed(range(shape[0])):
            if t + 1 < shape[0]:
                grad_z[t].addmm_(grad_z[t + 1], w_hh)
            grad_z[t].masked_fill_(dead[t], 0.0)
        dh = grad_z[0] @ w_hh if shape[0] else grad_out.new_zeros(shape[1:])
        grad_x, *grad_params = _parameter_grads(ctx, grad_z, sketches, w_ih, w_hh)
        return grad_x, dh if ctx.needs_input_grad[1] else None, *grad_params, None, None


class _LSTMFn(torch.autograd.Function):
    """One LSTM layer over a (T, B, n) sequence; returns ((T, B, H) hidden states, c_T)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, cfg: RAD, seed: int):
        steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        pre = _input_part(x, w_ih, b_ih, b_hh)
        h = x.new_zeros(batch, hidden) if h0 is None else h0
        c = x.new_zeros(batch, hidden) if c0 is None else c0
        out = x.new_empty(steps, batch, hidden)
        gates = torch.empty_like(pre)
        cells = torch.empty_like(out)
        for t in range(steps):
            g = torch.addmm(pre[t], h, w_hh.T)
            i, f, gg, o = g.chunk(4, 1)
            i, f, gg, o = i.sigmoid(), f.sigmoid(), gg.tanh(), o.sigmoid()
            c = f * c + i * gg
            h = o * c.tanh()
            gates[t] = torch.cat([i, f, gg, o], 1)
            cells[t], out[t] = c, h
        xs, hs = _sketch_inputs(ctx, x, h0, out, b_ih, b_hh, cfg, seed, 3)
        c_init = x.new_zeros(0) if c0 is None else c0  # c_{-1}, needed exactly by the f gate
        ctx.save_for_backward(w_ih, w_hh, gates, cells, c_init, *xs, *hs)
        return out, c

    @staticmethod
    def backward(ctx, grad_out, grad_cn):
        w_ih, w_hh, gates, cells, c_init, *sketches = ctx.saved_tensors
        grad_gates = torch.empty_like(gates)
        dh = grad_out.new_zeros(grad_out.shape[1:])
        dc = grad_cn.clone()
        for t in reversed(range(grad_out.shape[0])):
            dh = dh + grad_out[t]
            i, f, g, o = gates[t].chunk(4, 1)
            tc = cells[t].tanh()
            if t > 0:
                c_prev = cells[t - 1]
            else:
                c_prev = c_init if c_init.numel() else torch.zeros_like(tc)
            dc = dc + dh * o * (1 - tc * tc)
            grad_gates[t] = torch.cat(
                [
                    dc * g * i * (1 - i),
                    dc * c_prev * f * (1 - f),
                    dc * i * (1 - g * g),
                    dh * tc * o * (1 - o),
                ],
                1,
            )
            dc = dc * f
            dh = grad_gates[t] @ w_hh
        grad_x, *grad_params = _parameter_grads(ctx, grad_gates, sketches, w_ih, w_hh)
        need = ctx.needs_input_grad
        return grad_x, dh if need[1] else None, dc if need[2] else None, *grad_params, None, None


def rad_relu_rnn(
    x: torch.Tensor,
    h0: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    *,
    method: RAD | str = "rad",
    seed: int = 0,
) -> torch.Tensor:
    """ReLU RNN layer on x (T, B, n) from h0 (B, H) or zeros: the (T, B, H) hidden states.

    Forward and input / hidden-state gradients are exact; dW_ih, dW_hh use RAD sketches
    (``method``: a RAD config or its string form).
    """
    cfg = method_config(method, RAD, "rad_relu_rnn")
    x, h0, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h0, w_ih, w_hh, b_ih, b_hh)
    return _ReLURNNFn.apply(x, h0, w_ih, w_hh, b_ih, b_hh, cfg, seed)


def rad_lstm(
    x: torch.Tensor,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    *,
    method: RAD | str = "rad",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM layer on x (T, B, n): ((T, B, H) hidden states, final cell state (B, H)).

    Forward and input / state gradients are exact; dW_ih, dW_hh use RAD sketches
    (``method``: a RAD config or its string form).
    """
    cfg = method_config(method, RAD, "rad_lstm")
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    return _LSTMFn.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, cfg, seed)


# --- layers ---------------------------------------------------------------------------------


def _unsupported_rnn(module: nn.RNNBase) -> str | None:
    if module.bidirectional:
        return "bidirectional recurrent layers are not supported; kept exact"
    if module.dropout and module.num_layers > 1:
        return "dropout between recurrent layers is not supported; kept exact"
    if getattr(module, "proj_size", 0):
        return "proj_size > 0 is not supported; kept exact"
    return None


def _plain(layer: nn.Module, input) -> bool:
    """True in eval / no_grad, with every weight frozen, or for an empty input: then the layer's
    own PyTorch forward runs (with its own errors and empty results), no seed is drawn and
    nothing random is stored."""
    trainable = any(p.requires_grad for p in layer.parameters(recurse=False))
    empty = isinstance(input, torch.Tensor) and input.numel() == 0
    return empty or not (torch.is_grad_enabled() and trainable)


class _RADRNNBase(RandomizedLayer):
    """Shared sequence handling: batch_first, unbatched input, stacked layers."""

    def forward(self, input: torch.Tensor, hx=None):
        if _plain(self, input):
            return super().forward(input, hx)
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"{type(self).__name__} takes a padded tensor; PackedSequence is not supported"
            )
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else input
        if self.batch_first and not unbatched:
            x = x.transpose(0, 1)
        states = self._split_states(hx, unbatched)
        seed = self.rp_next_seed()
        finals = []
        for layer in range(self.num_layers):
            weights = [getattr(self, f"{w}_l{layer}", None) for w in _WEIGHT_NAMES]
            x, final = self._layer(
                x, states[layer], weights, self.rp_method, derive_seed(seed, layer)
            )
            finals.append(final)
        out = x.squeeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
        return out, self._join_states(finals, unbatched)


_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class RADRNN(_RADRNNBase, nn.RNN):
    """nn.RNN (nonlinearity='relu') with RAD weight gradients and 1-bit recurrent masks."""

    @staticmethod
    def rp_unsupported(module: nn.RNN) -> str | None:
        if module.nonlinearity != "relu":
            return "RAD through time needs nonlinearity='relu' (1-bit masks); kept exact"
        return _unsupported_rnn(module)

    def _split_states(self, hx, unbatched):
        if hx is None:
            return [None] * self.num_layers
        return list(hx.unsqueeze(1) if unbatched else hx)

    def _layer(self, x, h0, weights, cfg, seed):
        out = rad_relu_rnn(x, h0, *weights, method=cfg, seed=seed)
        return out, out[-1]

    def _join_states(self, finals, unbatched):
        h_n = torch.stack(finals)
        return h_n.squeeze(1) if unbatched else h_n


class RADLSTM(_RADRNNBase, nn.LSTM):
    """nn.LSTM with RAD weight gradients (gates and cell states stored exactly)."""

    rp_unsupported = staticmethod(_unsupported_rnn)

    def _split_states(self, hx, unbatched):
        if hx is None:
            return [(None, None)] * self.num_layers
        h, c = (s.unsqueeze(1) if unbatched else s for s in hx)
        return list(zip(h, c, strict=True))

    def _layer(self, x, state, weights, cfg, seed):
        out, c_n = rad_lstm(x, *state, *weights, method=cfg, seed=seed)
        return out, (out[-1], c_n)

    def _join_states(self, finals, unbatched):
        h_n = torch.stack([h for h, _ in finals])
        c_n = torch.stack([c for _, c in finals])
        if unbatched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return h_n, c_n


def _cell_weights(cell: nn.RNNCellBase):
    return cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh


class RADRNNCell(RandomizedLayer, nn.RNNCell):
    """nn.RNNCell (nonlinearity='relu') with RAD weight gradients: one step of :class:`RADRNN`."""

    @staticmethod
    def rp_unsupported(module: nn.RNNCell) -> str | None:
        if module.nonlinearity != "relu":
            return "RAD through time needs nonlinearity='relu' (1-bit masks); kept exact"
        return None

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        if _plain(self, input):
            return super().forward(input, hx)
        unbatched = input.dim() == 1
        x = input.reshape(1, -1, input.shape[-1])
        h0 = None if hx is None else hx.reshape(x.shape[1], -1)
        seed = self.rp_next_seed()
        h = rad_relu_rnn(x, h0, *_cell_weights(self), method=self.rp_method, seed=seed)[0]
        return h.squeeze(0) if unbatched else h


class RADLSTMCell(RandomizedLayer, nn.LSTMCell):
    """nn.LSTMCell with RAD weight gradients: one step of :class:`RADLSTM`."""

    def forward(self, input: torch.Tensor, hx=None) -> tuple[torch.Tensor, torch.Tensor]:
        if _plain(self, input):
            return super().forward(input, hx)
        unbatched = input.dim() == 1
        x = input.reshape(1, -1, input.shape[-1])
        h0, c0 = (None, None) if hx is None else (s.reshape(x.shape[1], -1) for s in hx)
        seed = self.rp_next_seed()
        out, c = rad_lstm(x, h0, c0, *_cell_weights(self), method=self.rp_method, seed=seed)
        h = out[0]
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


register_layers(
    RAD, {nn.RNN: RADRNN, nn.LSTM: RADLSTM, nn.RNNCell: RADRNNCell, nn.LSTMCell: RADLSTMCell}
)
