"""torch's fused kernels for the banded path, apart from the backend
interface (`_backend.torch`, which exports `attend_in_parts` and
`attend_band` from here): the far keys on the flash kernel of the tensors'
device (`far_kernel`), merged with the band by their log-sum-exps in
hand-written `autograd.Function`s. Imports nothing of the package."""

import functools

import torch
import torch.nn.functional as F


def compiling():
    """Whether `torch.compile` is tracing (the fused kernels run eagerly)."""
    return torch.compiler.is_compiling()


# Queries per block of the window's matmuls in `attend_band`.
WINDOW_ROWS = 128

def attend_in_parts(queries, constants, keys, values, band_queries, band_positions, band_keys,
                    key_mask):
    """The attention of a block of queries whose keys split in three parts:
    the keys before the band and after it, where the logits are `queries[p]
    . k_j + constants[p]_i` (a plain dot product plus a per-query constant),
    and the band, whose logits are `band_queries . k_j + band_positions`:
    each far part on a fused kernel for the tensors' device (`far_kernel`),
    with its log-sum-exp, the band explicitly, merged by their log-sum-exps
    (FlashAttention-2's and ring attention's merge). One
    `autograd.Function`, whose backward runs each far part's kernel backward
    with the merged output and log-sum-exp.

    Args:
        queries: `(left, right)` `(batch, rows, heads, d)` float32 scaled queries.
        constants: `(left, right)` `(batch, heads, rows)`.
        keys: `(batch, keys, heads, d)`; values `(batch, keys, heads, dv)`.
        band_queries: `(batch, rows, heads, d)`, for the keys `band_keys =
            (start, stop)`, with `band_positions` `(batch, heads, rows, band
            keys)` (the position terms and the head bias).
        key_mask: `(batch, keys)` bool (True: attend) or None. A row with no
            key to attend averages every value (edspdf's -10000 rule).

    Returns:
        `(batch, rows, heads, dv)`, or None where this does not apply (not
        float32: the caller joins the parts' logits and attends).
    """
    tensors = [*queries, *constants, keys, values, band_queries, band_positions]
    if any(t.dtype != torch.float32 for t in tensors):  # (not compiling: `attends_in_parts`)
        return None
    return _parts_function().apply(*tensors, band_keys, key_mask)


def _pad_last(x, size):
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _heads_first(x, size):
    """`(batch, length, heads, d)` as the kernels take it: `(batch, heads,
    length, size)` (zeros past `d`), its last axis contiguous.

    The kernels read the last axis as contiguous without checking its
    stride. A Keras projection to a small head size can leave the heads with
    the smallest stride (a head size of 1: a key width equal to the number of
    heads), and `F.pad` keeps such a layout (it guesses channels-last): the
    kernel then read the heads as the head dimension, and every number was
    wrong, silently. Copied only then: the other axes' strides the kernels
    read (a transposed view is not copied, and its keys not kept twice)."""
    return _last_axis_contiguous(x.transpose(1, 2), size)


def _last_axis_contiguous(x, size):
    """`x` zero-padded to `size` on its last axis, copied only where that
    axis is not contiguous (see `_heads_first`)."""
    x = _pad_last(x, size)
    return x if x.shape[-1] == 1 or x.stride(-1) == 1 else x.contiguous()


class _CpuFlash:
    """The CPU flash kernel, which returns its log-sum-exp."""

    name = "cpu_flash"

    @staticmethod
    def forward(q, k, v, mask, causal=False):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=1.0)
        return out, lse, None

    @staticmethod
    def backward(grad, q, k, v, mask, out, lse, state, causal=False):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=1.0)


class _CudaEfficient:
    """CUDA's memory-efficient kernel (it takes a mask and returns its
    log-sum-exp, padded to a multiple of 32 rows; its random state is kept
    for the backward). The mask is padded to 16 keys in memory, as
    `scaled_dot_product_attention` does for this kernel."""

    name = "cuda_efficient"

    @staticmethod
    def _bias(mask, q, k):
        if mask is None:
            return None
        n_keys = k.shape[2]
        bias = mask.expand(q.shape[0], q.shape[1], q.shape[2], n_keys)
        return F.pad(bias, (0, -n_keys % 16))[..., :n_keys]

    @staticmethod
    def forward(q, k, v, mask, causal=False):
        bias = _CudaEfficient._bias(mask, q, k)
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=1.0)
        return out, lse[..., :q.shape[2]], (lse.shape[-1], seed, offset)

    @staticmethod
    def backward(grad, q, k, v, mask, out, lse, state, causal=False):
        padded_rows, seed, offset = state
        lse = F.pad(lse, (0, padded_rows - lse.shape[-1]))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, _CudaEfficient._bias(mask, q, k), out, lse.contiguous(), seed,
            offset, 0.0, [True, True, True, False], causal, scale=1.0)
        return dq, dk, dv


class _Public:
    """Any other device: the public `scaled_dot_product_attention`, its
    log-sum-exp computed beside it, and the backward written out (`P =
    exp(S - lse)` of the merged log-sum-exp, as the fused backwards)."""

    name = "public"

    @staticmethod
    def _scores(q, k, mask, causal=False):
        scores = q @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        if causal:  # top-left: row r attends the keys up to r
            rows, keys = scores.shape[-2], scores.shape[-1]
            above = torch.ones(rows, keys, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(above, float("-inf"))
        return scores

    @staticmethod
    def forward(q, k, v, mask, causal=False):
        scores = _Public._scores(q, k, mask, causal)
        lse = torch.logsumexp(scores, -1)
        weights = torch.exp(scores - lse[..., None]).nan_to_num()
        return weights @ v, lse, None

    @staticmethod
    def backward(grad, q, k, v, mask, out, lse, state, causal=False):
        weights = torch.exp(_Public._scores(q, k, mask, causal) - lse[..., None])
        delta = (grad * out).sum(-1, keepdim=True)
        grad_scores = weights * (grad @ v.transpose(-1, -2) - delta)
        return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, weights.transpose(-1, -2) @ grad


def far_kernel(device):
    """The kernel of `attend_in_parts`' far parts for tensors on `device`:
    the CPU flash kernel on CPU, the memory-efficient one on CUDA, the
    public `scaled_dot_product_attention` elsewhere."""
    kind = torch.device(device).type
    return {"cpu": _CpuFlash, "cuda": _CudaEfficient}.get(kind, _Public)


def _merged_lse(lses):
    """The log-sum-exp over every part, from each part's `(batch, heads,
    rows)` one (-inf: a part with no key to attend)."""
    return torch.logsumexp(torch.stack(lses), 0)


@functools.cache
def _parts_function():
    class AttendInParts(torch.autograd.Function):
        """Forward: each far part's fused attention and log-sum-exp, the band's
        softmax, merged. Backward: each far part's kernel backward with the
        merged output and log-sum-exp (less its constant), whose `P = exp(S -
        lse)` is then the merged softmax's; the constants' gradient `w (dO .
        o_part - D)`; the band's logits' `P (dO . v - D)`."""

        @staticmethod
        def forward(ctx, q_left, q_right, c_left, c_right, keys, values, band_q, band_positions,
                    band_keys, key_mask):
            return _parts_forward(ctx, (q_left, q_right), (c_left, c_right), keys, values,
                                  band_q, band_positions, band_keys, key_mask)

        @staticmethod
        def backward(ctx, grad):
            return _parts_backward(ctx, grad)

    return AttendInParts


def _parts_forward(ctx, queries, constants, keys, values, band_q, band_positions, band_keys,
                   key_mask):
    """`AttendInParts.forward`: `(batch, rows, heads, dv)`."""
    (q_left, q_right), (c_left, c_right) = queries, constants
    kernel = far_kernel(keys.device)
    n_keys, d, dv = keys.shape[1], keys.shape[-1], values.shape[-1]
    size = max(d, dv)  # the kernels want one head size
    k, v = _heads_first(keys, size), _heads_first(values, size)
    additive = None
    if key_mask is not None:  # (batch, 1, 1, keys): 0 or -inf
        additive = torch.zeros(key_mask.shape, dtype=keys.dtype, device=keys.device)
        additive = additive.masked_fill(~key_mask, float("-inf"))[:, None, None]
    start, stop = band_keys
    far = _far_forward(kernel, ((q_left, c_left, 0, start), (q_right, c_right, stop,
                                                             n_keys)),
                       k, v, additive, key_mask, size, dv)
    bq = band_q.transpose(1, 2)  # (batch, heads, rows, d)
    logits = bq @ keys[:, start:stop].permute(0, 2, 3, 1) + band_positions
    if additive is not None:
        logits = logits + additive[..., start:stop]
    lse = _merged_lse([part["lse"] for part in far] + [torch.logsumexp(logits, -1)])
    finite = torch.isfinite(lse)  # False: a row with no key to attend
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    band_weights = torch.exp(logits - safe[..., None])
    out = band_weights @ v[:, :, start:stop, :dv]
    for part in far:
        part["weight"] = torch.where(torch.isfinite(part["lse"]),
                                     torch.exp(part["lse"] - safe),
                                     torch.zeros_like(safe))
        out += part["weight"][..., None] * part["out"]
    if not bool(finite.all()):
        uniform = v[..., :dv].mean(2, keepdim=True).expand_as(out)
        out = torch.where(finite[..., None], out, uniform)
    ctx.kernel, ctx.far = kernel, [
        {name: part[name] for name in ("side", "keys", "mask", "state")} for part in far]
    ctx.shape = (n_keys, d, dv, size, band_keys, bool(finite.all()))
    ctx.save_for_backward(keys, k, v, bq, out, safe, finite, band_weights,
                          *[part[name] for name in ("q", "c", "weight", "out")
                            for part in far])
    return out.transpose(1, 2)


def _parts_backward(ctx, grad):
    """`AttendInParts.backward`: the gradients of `forward`'s inputs."""
    keys, k, v, bq, out, safe, finite, band_weights, *rest = ctx.saved_tensors
    n_far = len(ctx.far)
    saved = [rest[i * n_far:(i + 1) * n_far] for i in range(4)]
    n_keys, d, dv, size, (start, stop), all_finite = ctx.shape
    grad = grad.transpose(1, 2)  # (batch, heads, rows, dv)
    lost = None
    if not all_finite:  # a row with no key to attend averages every value
        lost = torch.where(finite[..., None], torch.zeros_like(grad), grad)
        lost = lost.sum(2, keepdim=True) / n_keys
        grad = torch.where(finite[..., None], grad, torch.zeros_like(grad))
    delta = (grad * out).sum(-1)  # rowsum(dO * O), of the merged output
    band_values = v[:, :, start:stop, :dv]
    grad_band = band_weights * (grad @ band_values.transpose(-1, -2) - delta[..., None])
    k_parts = {"band": (grad_band.transpose(-1, -2) @ bq)}  # (batch, heads, band, d)
    v_parts = {"band": band_weights.transpose(-1, -2) @ grad}
    grads = {"band_q": (grad_band @ keys[:, start:stop].transpose(1, 2)).transpose(1, 2)}
    padded_grad, padded_out = _last_axis_contiguous(grad, size), _last_axis_contiguous(
        out, size)
    for part, q, c, weight, part_out in zip(ctx.far, *saved):
        first, last = part["keys"]
        dq, dk, dvv = ctx.kernel.backward(
            padded_grad, q, k[:, :, first:last], v[:, :, first:last], part["mask"],
            padded_out, (safe - c).contiguous(), part["state"])
        side = part["side"]
        k_parts[side], v_parts[side] = dk[..., :d], dvv[..., :dv]
        grads[side] = dq[..., :d].transpose(1, 2)
        grads[side + " constant"] = weight * ((grad * part_out).sum(-1) - delta)
    order = ("left", "band", "right")
    grad_k = torch.cat([k_parts[p] for p in order if p in k_parts], 2)
    grad_v = torch.cat([v_parts[p] for p in order if p in v_parts], 2)
    if lost is not None:
        grad_v = grad_v + lost
    return (grads.get("left"), grads.get("right"), grads.get("left constant"),
            grads.get("right constant"), grad_k.transpose(1, 2), grad_v.transpose(1, 2),
            grads["band_q"], grad_band, None, None)


def _far_forward(kernel, sides, k, v, additive, key_mask, size, dv):
    """Each far part with keys (left of the band, right of it): its
    queries `(batch, heads, rows, size)`, constant, key span, mask, kernel
    output `(batch, heads, rows, dv)`, log-sum-exp with its constant added
    (-inf where every key of the part is masked) and kernel state."""
    far = []
    for side, (q, c, first, last) in zip(("left", "right"), sides):
        if last <= first:
            continue
        q = _heads_first(q, size)
        mask = None if additive is None else additive[..., first:last].contiguous()
        out, lse, state = kernel.forward(q, k[:, :, first:last], v[:, :, first:last], mask)
        lse = lse + c
        if key_mask is not None:  # the kernels give lse 0 (or NaN) where every key is masked
            seen = key_mask[:, first:last].any(-1)[:, None, None]
            lse = torch.where(seen, lse, torch.full_like(lse, float("-inf")))
        far.append(dict(side=side, q=q, c=c, keys=(first, last), mask=mask,
                        out=torch.nan_to_num(out[..., :dv]), lse=lse, state=state))
    return far


# --- The banded path over the whole sequence (`attend_band`) ----------------
# Token-index positions: query i reads the table's left edge row for the keys
# j <= i + below, the right edge row for j >= i + above, and a row of its own
# for each of the `w = above - below - 1` keys between (its window). The far
# keys are then two causal attentions over the whole sequence (the left one
# shifted by `below`, the right one on the reversed sequence), on the fused
# kernel, which skips what the causal mask hides; the window is a band of
# `w` logits a query, made by blocks of `WINDOW_ROWS` queries against their
# keys and moved into place by a skew (a strided view): no gather, no
# per-block slices whose gradients would each fill a whole-input buffer.

# Beyond this many window logits `(batch, heads, queries, w)` (DeBERTa's wide
# buckets at length), the blocks of `attend_in_parts` bound the memory instead.
WINDOW_ELEMENTS = 2**24


def attend_band(far_queries, far_constants, keys, values, band_queries, window_table,
                window_scores, window, key_mask):
    """The banded attention of every query at once, or None where it does
    not apply (compiling, not float32, a window too large).

    Args:
        far_queries: `(left, right)` `(batch, n, heads, d)` scaled queries of
            the far keys (the queries plus the position queries' edge row).
        far_constants: `(left, right)` `(batch, heads, n)` added to each
            query's far logits (its score against the position keys' edge
            row, and the head bias).
        keys: `(batch, n, heads, d)`; values `(batch, n, heads, dv)`.
        band_queries: `(batch, n, heads, d)`, against the keys of the window.
        window_table: `(w, heads, d)` position queries of each window offset
            (p2c), added to `band_queries` against that key, or None.
        window_scores: `(batch, heads, n, w)` added to the window's logits
            (c2p, the head bias), or None.
        window: `(below, above)` Python ints, `below < 0 <= above`.
        key_mask: `(batch, n)` bool (True: attend) or None.

    Returns:
        `(batch, n, heads, dv)`.
    """
    below, above = window
    tensors = [*far_queries, *far_constants, keys, values, band_queries]
    batch, n, heads = keys.shape[0], keys.shape[1], keys.shape[2]
    width = above - below - 1
    if (compiling() or any(t.dtype != torch.float32 for t in tensors) or not below < 0 <= above
            or batch * heads * n * max(width, 1) > WINDOW_ELEMENTS):
        return None
    if key_mask is None:
        key_mask = torch.ones(batch, n, dtype=torch.bool, device=keys.device)
    logits = _window_logits(band_queries, keys, window_table, window_scores, below, width,
                            key_mask)
    return _band_function().apply(*far_queries, *far_constants, keys, values, logits,
                                  (below, above), key_mask)


def _window_rows(n):
    """Queries per block of the window's matmuls."""
    return max(1, min(WINDOW_ROWS, n))


def _padded_keys(x, below, width, rows):
    """`x` `(batch, n, ...)` padded on its length so that block `b` of `rows`
    queries finds its window keys at `[b * rows, b * rows + rows + width -
    1)`: `(batch, n_blocks * rows + width - 1, ...)`."""
    n = x.shape[1]
    left = -below - 1
    length = -(-n // rows) * rows + width - 1
    pad = [0, 0] * (x.dim() - 2) + [left, max(length - left - n, 0)]
    return F.pad(x, pad)[:, :length]


def _windowed_dots(rows_x, keys, below, width, rows):
    """`out[b, h, i, t] = rows_x[b, i, h] . keys[b, i + below + 1 + t, h]`
    (zero past the keys): `(batch, heads, n, width)`, by blocks of `rows`
    queries (one matmul against their `rows + width - 1` keys, then the
    skew: a strided view)."""
    batch, n, heads = rows_x.shape[0], rows_x.shape[1], rows_x.shape[2]
    n_blocks = -(-n // rows)
    span = rows + width - 1
    padded = _padded_keys(keys, below, width, rows)  # (b, L, h, d)
    windows = padded.unfold(1, span, rows)  # (b, blocks, h, d, span)
    queries = F.pad(rows_x, [0, 0, 0, 0, 0, n_blocks * rows - n])
    queries = queries.reshape(batch, n_blocks, rows, heads, -1).permute(0, 1, 3, 2, 4)
    full = (queries @ windows).contiguous()  # (b, blocks, h, rows, span)
    skewed = full.as_strided((batch, n_blocks, heads, rows, width),
                             (full.stride(0), full.stride(1), full.stride(2), span + 1, 1),
                             full.storage_offset())
    return skewed.permute(0, 2, 1, 3, 4).reshape(batch, heads, n_blocks * rows, width)[:, :, :n]


def _window_logits(band_queries, keys, window_table, window_scores, below, width, key_mask):
    """The window's logits `(batch, heads, n, w)`, -inf on the keys masked or
    past the sequence."""
    batch, n = keys.shape[0], keys.shape[1]
    rows = _window_rows(n)
    logits = _windowed_dots(band_queries, keys, below, width, rows)
    if window_table is not None:  # p2c: table[t] . k[i + below + 1 + t], a skew of k @ table
        padded = _padded_keys(keys, below, width, 1)  # (b, n + w - 1, h, d)
        scores = torch.einsum("blhd,thd->bhlt", padded, window_table).contiguous()
        logits = logits + scores.as_strided(
            (batch, scores.shape[1], n, width),
            (scores.stride(0), scores.stride(1), width, width + 1), scores.storage_offset())
    if window_scores is not None:
        logits = logits + window_scores
    seen = _padded_keys(key_mask, below, width, 1)  # (b, n + w - 1)
    seen = seen.as_strided((batch, n, width), (seen.stride(0), 1, 1), seen.storage_offset())
    return logits.masked_fill(~seen[:, None], float("-inf"))


@functools.cache
def _band_function():
    class AttendBand(torch.autograd.Function):
        """Forward: the two far causal attentions (fused, with their
        log-sum-exps) and the window's softmax, merged. Backward: each far
        part's kernel backward with the merged output and log-sum-exp, as
        `AttendInParts`; the window's logits `P (dO . v - D)`."""

        @staticmethod
        def forward(ctx, q_left, q_right, c_left, c_right, keys, values, logits, window,
                    key_mask):
            return _band_forward(ctx, (q_left, q_right), (c_left, c_right), keys, values,
                                 logits, window, key_mask)

        @staticmethod
        def backward(ctx, grad):
            return _band_backward(ctx, grad)

    return AttendBand


def _side(x, side, skip):
    """Rows of `x` `(batch, heads, n, ...)` as a far part's causal kernel
    takes them: the left part's from row `skip`; the right part's reversed,
    from row `skip` of the reversal."""
    return (x if side == "left" else x.flip(2))[:, :, skip:]


def _unside(x, side, skip, fill):
    """A far part's rows `(batch, heads, n - skip, ...)` back in the
    queries' order, `fill` where the part has no key."""
    pad = [0, 0] * (x.dim() - 3) + [skip, 0]
    x = F.pad(x, pad, value=fill)
    return x if side == "left" else x.flip(2)


def _band_forward(ctx, queries, constants, keys, values, logits, window, key_mask):
    below, above = window
    kernel = far_kernel(keys.device)
    n, d, dv = keys.shape[1], keys.shape[-1], values.shape[-1]
    size = max(d, dv)
    k, v = _heads_first(keys, size), _heads_first(values, size)
    additive = torch.zeros(key_mask.shape, dtype=keys.dtype, device=keys.device)
    additive = additive.masked_fill(~key_mask, float("-inf"))[:, None, None]
    sides, parts = (("left", -below), ("right", above)), []
    for (side, skip), q, c in zip(sides, queries, constants):
        if skip >= n:
            continue
        qs = _side(_heads_first(q, size), side, skip)
        ks, vs = _side(k, side, 0), _side(v, side, 0)
        mask = additive if side == "left" else additive.flip(-1)
        out, lse, state = kernel.forward(qs, ks, vs, mask.contiguous(), causal=True)
        seen = _side(key_mask[:, None, :, None].float(), side, 0).cummax(2).values[:, :, :-skip
                                                                                  or None]
        lse = torch.where(seen[..., 0] > 0, lse, torch.full_like(lse, float("-inf")))
        parts.append(dict(side=side, skip=skip, q=qs, k=ks, v=vs, mask=mask.contiguous(),
                          state=state, c=c, out=_unside(torch.nan_to_num(out[..., :dv]), side,
                                                        skip, 0.0),
                          lse=_unside(lse, side, skip, float("-inf")) + c))
    lse = torch.logsumexp(torch.stack([p["lse"] for p in parts]
                                      + [torch.logsumexp(logits, -1)]), 0)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    weights = torch.exp(logits - safe[..., None])  # (b, h, n, w)
    out = _windowed_values(weights, values, below)
    for part in parts:
        part["weight"] = torch.where(torch.isfinite(part["lse"]), torch.exp(part["lse"] - safe),
                                     torch.zeros_like(safe))
        out = out + part["weight"][..., None] * part["out"]
    if not bool(finite.all()):
        out = torch.where(finite[..., None], out, v[..., :dv].mean(2, keepdim=True))
    ctx.kernel, ctx.window, ctx.sizes = kernel, window, (n, d, dv, size)
    ctx.parts = [{key: p[key] for key in ("side", "skip", "state")} for p in parts]
    ctx.save_for_backward(values, out, safe, finite, weights,
                          *[p[key] for p in parts for key in _SAVED])
    return out.transpose(1, 2)


_SAVED = ("q", "k", "v", "mask", "weight", "out", "c")


def _band_backward(ctx, grad):
    values, out, safe, finite, weights, *rest = ctx.saved_tensors
    below, _ = ctx.window
    n, d, dv, size = ctx.sizes
    grad = grad.transpose(1, 2)  # (batch, heads, n, dv)
    lost = None
    if not bool(finite.all()):  # a row with no key to attend averages every value
        lost = torch.where(finite[..., None], torch.zeros_like(grad), grad)
        lost = lost.sum(2, keepdim=True).transpose(1, 2) / n
        grad = torch.where(finite[..., None], grad, torch.zeros_like(grad))
    delta = (grad * out).sum(-1)  # rowsum(dO * O), of the merged output
    with torch.enable_grad():  # the window: dO . v of each window key, and its values' share
        w_leaf, v_leaf = weights.detach().requires_grad_(), values.detach().requires_grad_()
        grad_weights, grad_v = torch.autograd.grad(
            _windowed_values(w_leaf, v_leaf, below), (w_leaf, v_leaf), grad)
    grad_logits = weights * (grad_weights - delta[..., None])
    grads = {}
    grad_k = None
    padded_grad = _last_axis_contiguous(grad, size)
    padded_out = _last_axis_contiguous(out, size)
    for index, part in enumerate(ctx.parts):
        q, k, v, mask, weight, part_out, c = rest[index * len(_SAVED):(index + 1) * len(_SAVED)]
        side, skip = part["side"], part["skip"]
        dq, dk, dvv = ctx.kernel.backward(
            _side(padded_grad, side, skip).contiguous(), q, k, v, mask,
            _side(padded_out, side, skip).contiguous(), _side(safe - c, side, skip).contiguous(),
            part["state"], causal=True)
        dk, dvv = _unside(dk[..., :d], side, 0, 0.0), _unside(dvv[..., :dv], side, 0, 0.0)
        grad_k = dk if grad_k is None else grad_k + dk
        grad_v = grad_v + dvv.transpose(1, 2)
        grads[side] = _unside(dq[..., :d], side, skip, 0.0).transpose(1, 2)
        grads[side + " constant"] = weight * ((grad * part_out).sum(-1) - delta)
    if lost is not None:
        grad_v = grad_v + lost
    grad_k = None if grad_k is None else grad_k.transpose(1, 2)
    return (grads.get("left"), grads.get("right"), grads.get("left constant"),
            grads.get("right constant"), grad_k, grad_v, grad_logits, None, None)


def _windowed_values(weights, values, below):
    """`out[b, h, i] = sum_t weights[b, h, i, t] values[b, i + below + 1 +
    t, h]`: `(batch, heads, n, dv)`, by blocks (the skew undone: each block's
    weights laid out against its `rows + w - 1` keys)."""
    batch, heads, n, width = weights.shape
    rows = _window_rows(n)
    n_blocks, span = -(-n // rows), rows + width - 1
    blocks = F.pad(weights, [0, 0, 0, n_blocks * rows - n]).reshape(
        batch, heads, n_blocks, rows, width)
    spread = F.pad(blocks, [0, rows]).reshape(batch, heads, n_blocks, rows * (rows + width))
    spread = spread[..., :rows * span].reshape(batch, heads, n_blocks, rows, span)
    windows = _padded_keys(values, below, width, rows).unfold(1, span, rows)  # (b, B, h, dv, s)
    out = spread.permute(0, 2, 1, 3, 4) @ windows.transpose(-1, -2)  # (b, B, h, rows, dv)
    return out.permute(0, 2, 1, 3, 4).reshape(batch, heads, n_blocks * rows, -1)[:, :, :n]
