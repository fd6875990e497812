"""Context-parallel retention on torch.distributed: one long sequence split across ranks.

Each rank of ``group`` holds a contiguous slice of the time axis, in rank order (rank r holds
positions [P_r, P_r + L_r); lengths may differ between ranks and may be 0).  Retention needs only
the [B, H, dk, dv] state from the ranks before it, because the ops take an initial state and
return its gradient::

    forward   every rank: local pass from a zero state  -> local final state  S_loc_r
              all-gather S_loc;  S_in_r = g^P_r S_0 + sum_{j<r} g^(P_r - E_j) S_loc_j   (E_j = P_j + L_j)
              correct the outputs for S_in_r (raw ops: o += scale g^(n+1) q_n S_in_r;
              fused msr: recompute with initial_state = S_in_r, its norm is not linear)
    backward  every rank: dS_in_r (the initial-state gradient of its own outputs)
              all-gather dS_in;  dS_out_r = sum_{j>r} g^(P_j - E_r) dS_in_j  (the gradient of the
              state rank r hands on, i.e. d_initial_state of the later ranks flowing back)
              one op backward with grad_final_state = dS_out_r -> dq, dk, dv as in one process

Communication: one all-gather of the local states per layer forward and one of the state
gradients per layer backward (plus 8 integers per rank for the slice layout).  A send/recv chain
(rank r waits for S_in_r, adds its own state, sends to r + 1) moves 1/(R-1) of the bytes, but puts
R-1 message latencies back to back on the critical path of every layer, forward and backward,
and the last rank idles until all of them arrived; a ring all-gather takes the same R-1 steps
(a tree all-gather log2 R), lets every rank combine the states itself (O(R) additions of one
state, nothing next to the O(L dk dv) local pass), gives every rank the final state of the
whole sequence for free, and is one call NCCL and gloo both implement well.  The state is
B*H*dk*dv*4 bytes, independent of T (512 KiB for H=8, dk=dv=128), so the bytes do not matter and
the latency does: all-gather.  See docs/distributed.md for the volumes against ring attention.

Gradient conventions (what "equal to one process" means here): the loss is the sum over ranks of
each rank's loss on its slice.  q, k, v (and g) get the gradient of that total, so after the
backward each rank holds exactly the single-process gradient of its slice.  A shared parameter
(projection weights, ``norm_weight``) gets on each rank the part from its slice: sum them over the
group (``all_reduce_gradients``).  ``initial_state`` is replicated (the same tensor on every rank)
and gets the full gradient on every rank; the returned final state is replicated too, and the
gradients the ranks send into it are summed.

Packed sequences (``cu_seqlens``) are refused: a packed sequence crossing a slice boundary would
need its own state hand-over, which is not implemented; split packed batches by sequence (data
parallel) instead.
"""
import math
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as rf
from .nn import MultiScaleRetention

__all__ = [
    "SliceLayout",
    "context_parallel_retention",
    "context_parallel_msr",
    "enable_context_parallel",
    "all_reduce_gradients",
    "slice_bounds",
    "local_slice",
]


def _group_rank_size(group):
    return dist.get_rank(group), dist.get_world_size(group)


def slice_bounds(total: int, world_size: int, rank: int):
    """[start, end) of rank's slice when ``total`` positions are split as evenly as possible
    (the first ``total % world_size`` ranks get one more)."""
    base, extra = divmod(int(total), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_slice(x: Tensor, group=None, dim: int = 1) -> Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (even split, see ``slice_bounds``)."""
    rank, world = _group_rank_size(group)
    start, end = slice_bounds(x.shape[dim], world, rank)
    return x.narrow(dim, start, end - start)


def _all_gather(t: Tensor, group) -> List[Tensor]:
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


class SliceLayout:
    """Where every rank's slice lies (gathered once per call): lengths, starts, total."""

    def __init__(self, lengths: List[int], rank: int):
        self.lengths = list(lengths)
        self.rank = rank
        self.starts = [0]
        for n in self.lengths[:-1]:
            self.starts.append(self.starts[-1] + n)
        self.total = sum(self.lengths)
        self.start = self.starts[rank]
        self.end = self.start + self.lengths[rank]

    def end_of(self, j):
        return self.starts[j] + self.lengths[j]

    @classmethod
    def gather(cls, group, length: int, shape_key, has_initial_state: bool, device):
        """All-gather (length, has_initial_state, *shape_key) and check the ranks agree, so a
        mismatch raises the same clear error on every rank instead of hanging a collective."""
        rank, world = _group_rank_size(group)
        mine = torch.tensor([int(length), int(has_initial_state)] + [int(s) for s in shape_key],
                            dtype=torch.int64, device=device)
        rows = [r.tolist() for r in _all_gather(mine, group)]
        for j, row in enumerate(rows):
            if row[2:] != rows[0][2:]:
                raise ValueError(
                    "context parallel: every rank must pass the same batch, heads, head dims and "
                    f"options; rank 0 has {rows[0][2:]}, rank {j} has {row[2:]} "
                    "(B, H, dk, dv, form, chunk_size, ...)")
            if row[1] != rows[0][1]:
                raise ValueError("context parallel: initial_state must be given on every rank or "
                                 f"on none (rank 0: {bool(rows[0][1])}, rank {j}: {bool(row[1])})")
        return cls([row[0] for row in rows], rank)


def _decay_power(log_decay: Tensor, n: int, dtype) -> Tensor:
    """g_h^n as [1, H, 1, 1] (exponent in float64, like the ops' own powers)."""
    return torch.exp(log_decay.to(torch.float64) * float(n)).to(dtype).view(1, -1, 1, 1)


def _combine(terms):
    """Sum of weight * state over (weight, state) pairs; None when there are none."""
    out = None
    for w, s in terms:
        out = w * s if out is None else out + w * s
    return out


class _RawCore:
    """Raw retention (chunk / parallel / recurrent forms) through the torch.ops.retention ops."""

    linear_in_state = True

    def __init__(self, form, log_decay, scale, chunk_size):
        self.form, self.log_decay, self.scale, self.chunk_size = form, log_decay, scale, chunk_size

    def forward(self, inputs, s_in, start):
        return rf.retention(*inputs, self.log_decay, form=self.form, scale=self.scale,
                            chunk_size=self.chunk_size, initial_state=s_in, output_final_state=True)

    def _position_decay(self, q, dtype):
        """g_h^(n+1) for local positions n: [1, L, H, 1]."""
        n = torch.arange(1, q.shape[1] + 1, dtype=torch.float64, device=q.device)
        return torch.exp(n[:, None] * self.log_decay.to(torch.float64)[None, :]).to(dtype)[None, :, :, None]

    def add_initial(self, out, inputs, s_in, start):
        # The op is linear in its initial state: o += scale g^(n+1) q_n S_in, one O(L dk dv) product
        # instead of a second pass; the weight is per (n, h), so it scales the product's rows and
        # the only temporary is the product itself.
        q = inputs[0]
        corr = torch.einsum("bnhk,bhkv->bnhv", q.to(s_in.dtype), s_in)
        corr.mul_(self.scale * self._position_decay(q, s_in.dtype))
        if out.dtype == corr.dtype:
            return out.add_(corr)  # out is the op's fresh output, not saved for backward
        return (out.to(corr.dtype) + corr).to(out.dtype)

    def initial_grad(self, grad_out, inputs, s_in, start):
        """d S_in of this rank's own outputs: scale sum_n g^(n+1) q_n^T do_n (no op pass)."""
        q = inputs[0]
        qs = q.to(s_in.dtype) * (self.scale * self._position_decay(q, s_in.dtype))
        return torch.einsum("bnhk,bnhv->bhkv", qs, grad_out.to(s_in.dtype)), None

    def backward(self, grad_out, grad_final, inputs, s_in, start):
        q, k, v = inputs
        args = dict(grad_o=grad_out, grad_final_state=grad_final, q=q, k=k, v=v,
                    log_decay=self.log_decay, scale=self.scale, initial_state=s_in)
        if self.form == "parallel":
            return rf.call_op("parallel_backward", **args)[:3]
        # the recurrent scan's gradient is the chunk form's (as in the op's own autograd)
        return rf.call_op("chunk_backward", chunk_size=self.chunk_size, **args)[:3]


class _MsrCore:
    """The fused layer core (rotation at absolute positions, norm, gate): inputs q, k, v, g and
    norm_weight (g and norm_weight may be None).  Its epilogue is not linear in the state, so the
    outputs are recomputed with S_in and the state gradient needs one backward pass of its own."""

    linear_in_state = False

    def __init__(self, log_decay, form, offsets, options):
        self.log_decay, self.form, self.base_offsets = log_decay, form, offsets
        self.options = options  # the op arguments that are the same in every call

    def _offsets(self, q, start):
        base = self.base_offsets
        if base is None:
            base = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
        return base + start

    def forward(self, inputs, s_in, start):
        q, k, v, g, nw = inputs
        return rf.call_op("msr_forward", q=q, k=k, v=v, g=g, log_decay=self.log_decay, form=self.form,
                          initial_state=s_in, offsets=self._offsets(q, start), cu_seqlens=None,
                          norm_weight=nw, **self.options)

    def _grads(self, grad_out, grad_final, inputs, s_in, start):
        q, k, v, g, nw = inputs
        dq, dk, dv, dg, d_init, dnw = rf.call_op(
            "msr_backward", grad_y=grad_out, grad_final_state=grad_final, q=q, k=k, v=v, g=g,
            log_decay=self.log_decay, initial_state=s_in, offsets=self._offsets(q, start),
            cu_seqlens=None, norm_weight=nw, **self.options)
        return [dq, dk, dv, None if g is None else dg, None if nw is None else dnw], d_init

    def initial_grad(self, grad_out, inputs, s_in, start):
        grads, d_init = self._grads(grad_out, None, inputs, s_in, start)
        return d_init, grads

    def backward(self, grad_out, grad_final, inputs, s_in, start):
        return self._grads(grad_out, grad_final, inputs, s_in, start)[0]


class _ContextParallel(torch.autograd.Function):
    """(out, final_state) of one rank's slice; see the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx, core, layout, group, gather_final_grad, state_shape, initial_state, *inputs):
        q = inputs[0]
        sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        ld = core.log_decay
        r = layout.rank
        out, s_loc = core.forward(inputs, None, layout.start)
        states = _all_gather(s_loc.to(sdt), group)

        s0 = None if initial_state is None else initial_state.to(sdt)
        terms = [] if s0 is None else [(_decay_power(ld, layout.start, sdt), s0)]
        terms += [(_decay_power(ld, layout.start - layout.end_of(j), sdt), states[j]) for j in range(r)]
        s_in = _combine(terms)
        if s_in is not None:
            if core.linear_in_state:
                out = core.add_initial(out, inputs, s_in, layout.start)
            else:  # drop the first pass's output before recomputing
                del out
                out = core.forward(inputs, s_in, layout.start)[0]
        final_terms = [] if s0 is None else [(_decay_power(ld, layout.total, sdt), s0)]
        final_terms += [(_decay_power(ld, layout.total - layout.end_of(j), sdt), states[j])
                        for j in range(len(states))]
        final = _combine(final_terms)
        if final is None:
            final = torch.zeros(state_shape, dtype=sdt, device=q.device)

        if s_in is None:  # the op backward needs a tensor to return d_initial_state for
            s_in = torch.zeros(state_shape, dtype=sdt, device=q.device)
        ctx.core, ctx.layout, ctx.group, ctx.gather_final_grad = core, layout, group, gather_final_grad
        ctx.has_initial_state = initial_state is not None
        ctx.save_for_backward(s_in, *inputs)
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        if torch.is_grad_enabled():
            raise RuntimeError("context parallel retention: double backward is not supported")
        s_in, *inputs = ctx.saved_tensors
        core, layout, group = ctx.core, ctx.layout, ctx.group
        ld, sdt, r = core.log_decay, s_in.dtype, layout.rank
        grad_out = grad_out.contiguous()
        d_direct, grads = core.initial_grad(grad_out, inputs, s_in, layout.start)
        if ctx.gather_final_grad:
            gathered = _all_gather(torch.stack([d_direct.to(sdt), grad_final.to(sdt)]), group)
            d_in = [t[0] for t in gathered]
            d_final = torch.stack([t[1] for t in gathered]).sum(0)
        else:
            d_in, d_final = _all_gather(d_direct.to(sdt), group), None
        world = len(d_in)

        # Gradient of the state this rank hands on (its local final state).
        terms = [(_decay_power(ld, layout.starts[j] - layout.end, sdt), d_in[j])
                 for j in range(r + 1, world) if layout.lengths[j] > 0]
        if d_final is not None:
            terms.append((_decay_power(ld, layout.total - layout.end, sdt), d_final))
        d_out_state = _combine(terms)
        if grads is None or d_out_state is not None:
            grads = None  # free the first pass's gradients before the second
            grads = core.backward(grad_out, d_out_state, inputs, s_in, layout.start)

        d_initial = None
        if ctx.has_initial_state:
            terms = [(_decay_power(ld, layout.starts[j], sdt), d_in[j]) for j in range(world)]
            if d_final is not None:
                terms.append((_decay_power(ld, layout.total, sdt), d_final))
            d_initial = _combine(terms)
        return (None, None, None, None, None, d_initial, *grads)


def _check_not_packed(cu_seqlens):
    if cu_seqlens is not None:  # (the layers pack an attention_mask's batch into cu_seqlens)
        raise ValueError(
            "context parallel: packed or padded sequences (cu_seqlens, attention_mask) are not "
            "supported: a sequence that crosses a slice boundary would need its own state "
            "hand-over; pass unpadded sequences of equal length, or split packed batches by "
            "sequence across ranks (data parallel) instead")


def _run(core, group, inputs, initial_state, output_final_state, shape_key):
    q, v = inputs[0], inputs[2]
    B, L, H, dk = q.shape
    state_shape = (B, H, dk, v.shape[-1])
    group = dist.group.WORLD if group is None else group
    layout = SliceLayout.gather(group, L, list(state_shape) + list(shape_key),
                                initial_state is not None, q.device)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must have shape [B, H, dk, dv] = {list(state_shape)}, "
                         f"got {list(initial_state.shape)}")
    out, final = _ContextParallel.apply(core, layout, group, bool(output_final_state), state_shape,
                                        initial_state, *inputs)
    return out, final, layout


def context_parallel_retention(q, k, v, log_decay, *, group=None, form="chunk", scale=None,
                               chunk_size=64, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
    """Raw retention of one sequence whose time axis is split across the ranks of ``group``.

    Each rank passes its own slice ``q, k [B, L_r, H, dk]``, ``v [B, L_r, H, dv]`` (ranks in
    order, any lengths, 0 allowed; B, H, dk, dv and the options equal on every rank) and gets the
    outputs of its slice, equal to ``retention.retention`` on the whole sequence.  ``initial_state``
    (state before the whole sequence) and the returned final state (after the whole sequence) are
    replicated on every rank.  Every rank must call it (and run the backward) together.
    """
    _check_not_packed(cu_seqlens)
    shape_key = [rf.form_code(form), int(chunk_size)]
    core = _RawCore(form, log_decay, rf.resolve_scale(q, scale), int(chunk_size))
    out, final, _ = _run(core, group, (q, k, v), initial_state, output_final_state, shape_key)
    return (out, final) if output_final_state else out


def context_parallel_msr(q, k, v, g, log_decay, *, group=None, form="chunk", scale=None,
                         chunk_size=64, rotary="torchscale", norm=True, norm_weight=None, eps=1e-6,
                         decay_norm=False, initial_state=None, offsets=None, cu_seqlens=None,
                         output_final_state=False, _return_layout=False):
    """``retention.msr`` on one sequence split across the ranks of ``group``.

    Same arguments as ``retention.msr`` for this rank's slice; rotation and the decay normaliser
    use absolute positions ``offsets + P_r + n`` (P_r: the start of this rank's slice, found from
    the other ranks' lengths).  ``norm_weight`` gets this rank's part of its gradient (sum over
    the group).  See ``context_parallel_retention`` for the other conventions.
    """
    _check_not_packed(cu_seqlens)
    shape_key = [rf.form_code(form), int(chunk_size), rf.rotary_code(rotary), int(bool(norm)),
                 int(bool(decay_norm)), int(g is not None), int(norm_weight is not None)]
    if offsets is not None:
        offsets = torch.as_tensor(offsets, dtype=torch.int64, device=q.device).reshape(-1)
        offsets = offsets.expand(q.shape[0]) if offsets.numel() == 1 else offsets
    options = dict(scale=rf.resolve_scale(q, scale), chunk_size=chunk_size, rotary=rotary, norm=norm,
                   eps=eps, decay_norm=decay_norm)
    core = _MsrCore(log_decay, form, offsets, options)
    out, final, layout = _run(core, group, (q, k, v, g, norm_weight), initial_state,
                              output_final_state, shape_key)
    if _return_layout:
        return out, final, layout
    return (out, final) if output_final_state else out


# ---------------------------------------------------------------------------------------------
# Layers

class _DefaultGroup:
    """The default (world) group, looked up at each call. A layer never holds the default group
    object: a held group outlives ``destroy_process_group`` with its backend's threads and is
    torn down during interpreter shutdown instead, where gloo's threads can abort the process."""

    def __repr__(self):
        return "WORLD"


WORLD = _DefaultGroup()


class _ContextParallelCore:
    """A ``MultiScaleRetention.core``: ``context_parallel_msr`` over ``group`` (``WORLD`` or a
    group).  The layer's input is this rank's slice; the call covers the whole sequence, whose
    length it returns with the replicated final state."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q, k, v, g, log_decay, *, output_final_state=False, **kwargs):
        group = None if self.group is WORLD else self.group
        y, final, layout = context_parallel_msr(q, k, v, g, log_decay, group=group,
                                                output_final_state=output_final_state,
                                                _return_layout=True, **kwargs)
        return (y, final, layout.total) if output_final_state else y

    def __repr__(self):
        return f"context_parallel_msr(group={self.group!r})"


def enable_context_parallel(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Make every ``MultiScaleRetention`` in ``model`` (e.g. a ``RetNet``) context parallel over
    ``group`` (default: the whole world, looked up at each call); ``group=False`` turns it off.
    Returns ``model``.

    Each rank then feeds its slice of the sequence (``local_slice``) and gets the logits of its
    slice; sum the parameter gradients over the group (``all_reduce_gradients``). The layers hold
    an explicit ``group`` until it is turned off: do that before ``destroy_process_group``.
    Packed or padded batches (``cu_seqlens``, ``attention_mask``) and unfused layers are
    refused; ``step`` (decoding) stays local to each rank."""
    if group is None and not dist.is_initialized():
        raise RuntimeError("enable_context_parallel: call torch.distributed.init_process_group "
                           "first (or pass a group)")
    core = rf.msr if group is False else _ContextParallelCore(WORLD if group is None else group)
    for m in model.modules():
        if isinstance(m, MultiScaleRetention):
            m.core = core
    return model


def all_reduce_gradients(model: torch.nn.Module, group=None, average: bool = False) -> None:
    """Sum (or average) every parameter's ``.grad`` over ``group``, one flat all-reduce.

    Context parallel: each rank holds the part of a shared weight's gradient that comes from its
    slice, and the sum is the single-process gradient (average=False)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    offset = 0
    for g_ in grads:
        n = g_.numel()
        g_.copy_(flat[offset:offset + n].view_as(g_))
        offset += n
