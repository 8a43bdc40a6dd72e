"""An independent NumPy implementation of the documented semantics.

Written from the README's formulas, not from the layer: it gathers the
projected table rows for every (query, key) pair and takes dot products,
where the layer scores every query against the whole table and then gathers.
"""

import numpy as np


def _dense(x, kernel, bias):
    out = np.einsum("bsi,ihd->bshd", x, kernel)
    return out if bias is None else out + bias


def reference_attention(
    w, cfg, queries, keys=None, values=None, mask=None, relative_positions=None,
    no_position_mask=None, base_attn=None,
):
    """`w`: dict of weights by role; `cfg`: the layer's config dict."""
    keys = queries if keys is None else keys
    n_add, d, n_coords = cfg["n_additional_heads"], cfg["head_size"], cfg["n_coordinates"]
    mode = cfg["mode"]
    q = _dense(queries, *w["query"]).astype(np.float64)
    k = _dense(keys, *w["key"]).astype(np.float64)
    b, nq, heads, _ = q.shape
    nk = k.shape[1]
    terms = []
    if "c2c" in mode:
        terms.append(np.einsum("bqhd,bkhd->bqkh", q, k) / np.sqrt(d))
    positional = [m for m in mode if m != "c2c"]
    if relative_positions is not None and positional:
        table = w["position_embedding"].astype(np.float64)
        n_pos = table.shape[0]
        t = table.reshape(n_pos, n_coords, -1)
        def project(role):  # a projection no term reads is absent
            if role not in w:
                return None
            return np.einsum("pxi,xihd->pxhd", t, w[role][0]) + w[role][1]

        pos_k, pos_q = project("position_key"), project("position_query")
        rel = np.broadcast_to(np.asarray(relative_positions), (b, nq, nk, n_coords))
        idx = np.clip(n_pos // 2 + rel.astype(np.int64), 0, n_pos - 1)
        chunk = d // n_coords
        qx = q.reshape(b, nq, heads, n_coords, chunk)
        kx = k.reshape(b, nk, heads, n_coords, chunk)
        keep = 1.0
        if no_position_mask is not None:
            npm = np.broadcast_to(np.asarray(no_position_mask, bool), (b, nq, nk))
            keep = (~npm)[..., None].astype(np.float64)
        for term in positional:
            total = np.zeros((b, nq, nk, heads))
            for x in range(n_coords):
                if term == "c2p":
                    rows = pos_k[idx[..., x], x]  # (b, q, k, heads, chunk)
                    total += np.einsum("bqhd,bqkhd->bqkh", qx[:, :, :, x], rows)
                else:
                    rows = pos_q[idx[..., x], x]
                    total += np.einsum("bqkhd,bkhd->bqkh", rows, kx[:, :, :, x])
            terms.append(total / np.sqrt(d) * keep)
    logits = sum(terms) / np.sqrt(len(terms))
    if base_attn is not None:
        logits = logits + base_attn
    if w.get("head_bias") is not None:
        logits = logits + w["head_bias"]
    if values is None:
        return logits
    v = _dense(values, *w["value"]).astype(np.float64)
    pool = logits[..., n_add:]
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        m = {2: m[:, None, :, None], 3: m[..., None], 4: m}[m.ndim]
        pool = np.where(m, pool, -10000.0)
    pool = np.exp(pool - pool.max(axis=2, keepdims=True))
    weights = pool / pool.sum(axis=2, keepdims=True)
    pooled = np.einsum("bqkh,bkhd->bqhd", weights, v)
    return pooled.reshape(b, nq, -1), logits


def weights_of(layer):
    """The layer's weights by role, as float64 numpy arrays."""
    import keras

    def arr(v):
        return np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64)

    def dense(d):
        return arr(d.kernel), arr(d.bias)

    w = {"key": dense(layer.key_projection), "query": dense(layer.query_projection)}
    if layer.do_pooling:
        w["value"] = dense(layer.value_projection)
    if layer.position_embedding_shape is not None:
        w["position_embedding"] = arr(layer.position_embedding)
        for term, projection in (("position_key", layer.position_key_projection),
                                 ("position_query", layer.position_query_projection)):
            if projection is not None:  # None: no term of the mode reads it
                w[term] = dense(projection)
    w["head_bias"] = arr(layer.head_bias) if layer.use_head_bias else None
    return w
