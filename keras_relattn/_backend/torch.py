"""The backend interface on torch: gathers along rows straight into the
softmax's layout, logits updated in place in inference, and one
`autograd.Function` for the recomputed blocks. The banded path's fused
kernels (`attend_in_parts`, `attend_band`) are in `_backend.torch_fused`."""

import functools

import torch
import torch.nn.functional as F

from keras_relattn._records import flatten, rebuild
from keras_relattn._backend.torch_fused import (  # noqa: F401  (the interface)
    attend_band,
    attend_in_parts,
    compiling as _compiling,
)
from keras_relattn._backend.generic import (  # noqa: F401  (the interface)
    place_keys,
    _heads_to,
    exact_gelu,
    softmax,
    traced,
)

# `torch.gather` takes int64 indices only.
INDEX_DTYPE = "int64"
SCORE_LAYOUT = "head_major"
# Each op is one pass over memory eagerly: the position terms are gathered
# straight into the `(batch, heads, queries, keys)` logits the softmax reads.
LOGITS_LAYOUT = "bhqk"
# `torch.gather` along each row of `(b, h, q, P)` / `(b, h, P, k)` scores:
# both come out contiguous in the softmax's layout, with no strided add after
# (docs/performance.md, "How it is computed").
GATHERS_ALONG_ROWS = True
# The far keys on the flash kernel: blocks of 256 queries (the band's explicit
# part grows with them, the per-block overhead shrinks).
BAND_ROWS = 256


# Eagerly, the band's fixed cost (its window made by blocks, the two far
# calls, the merge) passes what it saves below 512 keys: banded / per-token
# at 128, 256, 384, 512, 768, 1024 keys, forward 1.87, 1.56, 1.28, 0.82,
# 0.59, 0.55; forward + backward 1.92, 1.66, 1.39, 1.04, 0.73, 0.59
# (benchmarks/band_crossover.txt). Compiled: the band throughout.
BAND_MIN_KEYS = 512


def band_min_keys():
    return 1 if _compiling() else BAND_MIN_KEYS


def fuses_band():
    return not _compiling()


def attends_in_parts():
    return not _compiling()


def default_block_elements():
    """2**20 eagerly: fresh buffers larger than 4 MiB cost page faults on
    every call on CPU (glibc hands them back to the system). Inductor plans
    its own buffers: 2**23 under `torch.compile`."""
    return 2**23 if _compiling() else 2**20


def sizes_are_frozen():
    return torch.jit.is_tracing()


def take_columns(table, columns, heads_last=True):
    # index_select takes int32 indices as they are (no int64 copy).
    taken = torch.index_select(table, 1, columns.reshape(-1))
    taken = taken.reshape((table.shape[0],) + tuple(columns.shape))
    return _heads_to(taken, columns, heads_last)  # a view, read in place by the add after it


def take_along_rows(scores, index, axis, out=None):
    batch, heads = scores.shape[0], scores.shape[1]
    index = index.to(torch.int64)[:, None].expand(batch, heads, *index.shape[1:])
    return torch.gather(scores, axis, index, out=out)


def works_in_place(tensors):
    """Inference in place: not compiling (inductor fuses the generic form),
    no gradient recorded, float32 (the in-place softmax's dtype)."""
    if _compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dtype == torch.float32 for t in tensors)


def add_in_place(total, term):
    return total.add_(term)


def add_matmul_in_place(total, a, b):
    batch, heads, n_rows, n_keys = total.shape
    total.view(-1, n_rows, n_keys).baddbmm_(
        a.reshape(batch * heads, n_rows, -1), b.reshape(batch * heads, -1, n_keys)
    )
    return total


def multiply_in_place(total, factor):
    return total.mul_(factor)


def masked_softmax_in_place(logits, attend, masked_logit):
    if attend is not None:
        logits.masked_fill_(torch.logical_not(attend), masked_logit)
    logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(-1, keepdim=True))


def layer_norm(x, gamma, beta, epsilon, size):
    """`F.layer_norm` over a `size` from the layer's configuration: Keras'
    torch layer norm reads it from the input's shape, which `torch.jit.trace`
    records as a traced value the ONNX exporter cannot make constant. In at
    least float32, as Keras computes it."""
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)
    out = F.layer_norm(x.to(compute), (size,), gamma.to(compute), beta.to(compute), epsilon)
    return out.to(dtype)


def _needs_grad(leaves):
    return torch.is_grad_enabled() and any(t.requires_grad for t in leaves)


def checkpoint(fn, rows, tensors, constants):
    leaves, skeleton = flatten(tensors)
    if not _needs_grad(leaves):
        return fn(rows, tensors, constants)
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    return torch_checkpoint(
        lambda *values: fn(rows, rebuild(skeleton, values), constants),
        *leaves, use_reentrant=False,
    )


def recomputed_blocks(fn, blocks, tensors, constants, key):
    """One `autograd.Function` (eager, gradients recorded): its forward
    writes every block into one output; its backward recomputes one block at
    a time and adds its gradients in place. None under `torch.compile`
    (a checkpoint per block) or without gradients."""
    leaves, skeleton = flatten(tensors)
    if _compiling() or not _needs_grad(leaves):
        return None

    def block(rows, *values):
        return fn(rows, rebuild(skeleton, values), constants)

    return _recomputed_blocks_function().apply(block, blocks, *leaves)


@functools.cache
def _recomputed_blocks_function():
    class RecomputedBlocks(torch.autograd.Function):
        """Forward: every block, nothing kept but the inputs. Backward: per
        block, its forward again and `autograd.grad`, the gradients added
        in place into one buffer per input (FlashAttention-2's order)."""

        @staticmethod
        def forward(ctx, fn, blocks, *tensors):
            ctx.fn, ctx.blocks = fn, blocks
            ctx.save_for_backward(*tensors)
            # Each block written into one output made once: a small block
            # output kept between the blocks' large temporaries would pin
            # glibc's heap, which then grows by a block at every block.
            first = fn(blocks[0], *tensors)
            n_queries = blocks[-1].stop
            pooled = first.new_empty((first.shape[0], n_queries) + tuple(first.shape[2:]))
            pooled[:, blocks[0]] = first
            del first
            for rows in blocks[1:]:
                pooled[:, rows] = fn(rows, *tensors)
            return pooled

        @staticmethod
        def backward(ctx, grad):
            tensors = ctx.saved_tensors
            wanted = [i for i in range(len(tensors)) if ctx.needs_input_grad[2 + i]]
            sums = {i: torch.zeros_like(tensors[i]) for i in wanted}
            for rows in ctx.blocks:
                with torch.enable_grad():
                    inputs = [t.detach().requires_grad_(i in sums) for i, t in enumerate(tensors)]
                    out = ctx.fn(rows, *inputs)
                    grads = torch.autograd.grad(
                        out, [inputs[i] for i in wanted], grad[:, rows], allow_unused=True
                    )
                for i, g in zip(wanted, grads):
                    if g is not None:
                        sums[i].add_(g)
                del out, inputs, grads
            return (None, None, *(sums.get(i) for i in range(len(tensors))))

    return RecomputedBlocks
