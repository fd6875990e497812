"""Per-rank bodies of the torch.distributed tests, run inside distributed_worker's processes.

Every task gets the whole problem (small tensors), takes its rank's part, runs it through the
code under test and returns what the test compares with one process on the whole problem.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from retention import distributed as rd
from retention.nn import RetNet


def _slice(x, lengths, rank, dim=1):
    return x.narrow(dim, sum(lengths[:rank]), lengths[rank])


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_()


def _grad(x):
    return None if x is None else (x.grad if x.grad is not None else torch.zeros_like(x))


def raw_retention(rank, group, q, k, v, log_decay, lengths, form, chunk_size, initial_state,
                  grad_o, grad_final, final_weights):
    """Loss = <o, grad_o> on the slice + final_weights[rank] * <final, grad_final>: the weights
    sum to 1, so the total over ranks is the single-process <o, grad_o> + <final, grad_final>."""
    assert dist.get_world_size(group) == len(lengths)
    ql, kl, vl = (_leaf(_slice(t, lengths, rank)) for t in (q, k, v))
    s0 = _leaf(initial_state)
    o, final = rd.context_parallel_retention(ql, kl, vl, log_decay, group=group, form=form,
                                             chunk_size=chunk_size, initial_state=s0,
                                             output_final_state=True)
    loss = (o * _slice(grad_o, lengths, rank)).sum() + final_weights[rank] * (final * grad_final).sum()
    loss.backward()
    return dict(o=o.detach(), final=final.detach(), dq=_grad(ql), dk=_grad(kl), dv=_grad(vl),
                ds0=_grad(s0))


def msr(rank, group, q, k, v, g, norm_weight, log_decay, lengths, kwargs, initial_state, grad_y,
        grad_final, final_weights):
    ql, kl, vl, gl = (_leaf(None if t is None else _slice(t, lengths, rank)) for t in (q, k, v, g))
    nw, s0 = _leaf(norm_weight), _leaf(initial_state)
    y, final = rd.context_parallel_msr(ql, kl, vl, gl, log_decay, group=group, norm_weight=nw,
                                       initial_state=s0, output_final_state=True, **kwargs)
    loss = (y * _slice(grad_y, lengths, rank)).sum() + final_weights[rank] * (final * grad_final).sum()
    loss.backward()
    return dict(y=y.detach(), final=final.detach(), dq=_grad(ql), dk=_grad(kl), dv=_grad(vl),
                dg=_grad(gl), dnw=_grad(nw), ds0=_grad(s0))


def _model(config, state_dict):
    model = RetNet(**config)
    model.load_state_dict(state_dict)
    return model


def retnet_context_parallel(rank, group, config, state_dict, tokens, targets, lengths, form):
    """Loss = sum of the token losses of the slice / all tokens: the ranks' losses sum to the
    single-process mean; the parameter gradients are summed over the group."""
    model = rd.enable_context_parallel(_model(config, state_dict), group)
    logits, state = model(_slice(tokens, lengths, rank), form=form)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           _slice(targets, lengths, rank).reshape(-1), reduction="sum") / targets.numel()
    loss.backward()
    rd.all_reduce_gradients(model, group)
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return dict(loss=total, logits=logits.detach(),
                grads={n: p.grad for n, p in model.named_parameters()},
                states=[s.state for s in state.layers], offset=state.offset)


def _fsdp_wrap(model, group):
    # FSDP2 (torch >= 2.6): the FSDP that runs on CPU with gloo (FSDP1 needs an accelerator).
    # One unit per decoder layer plus the root, on a mesh over this group's ranks.
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, "cpu")
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def data_parallel(rank, group, config, state_dict, tokens, targets, lr, wrapper):
    """`len(tokens)` SGD steps on this rank's rows of each batch under DDP or FSDP.  Returns the
    global loss of every step and the full gradients of the first step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = dist.get_world_size(group)
    model = _model(config, state_dict)
    wrapped = DDP(model, process_group=group) if wrapper == "ddp" else _fsdp_wrap(model, group)
    opt = torch.optim.SGD(wrapped.parameters(), lr=lr)
    rows = tokens.shape[1] // world
    losses, first_grads = [], None
    for step in range(tokens.shape[0]):
        tok = tokens[step, rank * rows:(rank + 1) * rows]
        tgt = targets[step, rank * rows:(rank + 1) * rows]
        opt.zero_grad()
        logits, _ = wrapped(tok)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        if step == 0:  # FSDP: the gradients are sharded DTensors; gather the full ones
            first_grads = {n: (p.grad.full_tensor() if wrapper == "fsdp" else p.grad).clone()
                           for n, p in model.named_parameters()}
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=group)
        losses.append(float(mean) / world)
    return dict(losses=losses, grads=first_grads)


def mismatched_shapes(rank, group):
    """Rank 1 passes another dv: every rank must raise the same ValueError (no hang)."""
    dv = 5 + rank
    q = torch.randn(1, 4, 2, 8)
    v = torch.randn(1, 4, 2, dv)
    try:
        rd.context_parallel_retention(q, q, v, torch.zeros(2), group=group)
    except ValueError as e:
        return str(e)
    return "no error"
