"""At home in Keras: symbolic shapes, masks, jit, mixed precision, training,
shared tables and adapters (distribution is in test_distribution.py)."""


import keras
import numpy as np
import pytest
from keras import ops

from helpers import BACKEND, gradients, to_numpy
from keras_relattn import PositionTable, RelativeAttention


def sequence_positions(length, batch=1):
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
    return np.repeat(offsets[None, :, :, None], batch, axis=0).astype("int32")


def attention(rng, **kwargs):
    kwargs.setdefault("position_embedding", rng.normal(size=(9, 8)).astype("float32"))
    return RelativeAttention(16, 2, n_coordinates=2, **kwargs)


# ---------------------------------------------------------------- 1. symbolic
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("values", [False, True])
@pytest.mark.parametrize("lengths", [(None, None), (5, 7)])
def test_symbolic_output_shapes_and_dtypes(cross, values, lengths):
    layer = RelativeAttention(16, 2, query_size=12, key_size=20 if cross else 12,
                              value_size=10, n_additional_heads=1)
    nq, nk = lengths if cross else (lengths[0], lengths[0])
    q = keras.Input((nq, 12))
    k = keras.Input((nk, 20)) if cross else None
    v = keras.Input((nk, 10)) if values else None
    out = layer(q, k, v)
    logits_shape = (None, nq, nk, 3)
    if values:
        pooled, logits = out
        assert tuple(pooled.shape) == (None, nq, 16)
        assert pooled.dtype == "float32"
    else:
        logits = out
    assert tuple(logits.shape) == logits_shape and logits.dtype == "float32"
    shapes = layer.compute_output_shape(
        q.shape, None if k is None else k.shape, None if v is None else v.shape
    )
    assert shapes == (((None, nq, 16), logits_shape) if values else logits_shape)


def test_symbolic_dtype_follows_the_policy():
    layer = RelativeAttention(8, 2, dtype="mixed_bfloat16")
    x = keras.Input((None, 8))
    pooled, logits = layer(x, x, x)
    assert pooled.dtype == logits.dtype == "bfloat16"


# ------------------------------------------------------------------- 2. masks
def embedded(ids, name, size=16, vocab=20):
    return keras.layers.Embedding(vocab, size, mask_zero=True, name=name)(ids)


def padded_ids(rng, batch, length):
    ids = rng.integers(1, 20, size=(batch, length))
    for row, n in enumerate(rng.integers(1, length + 1, size=batch)):
        ids[row, n:] = 0
    return ids


def test_self_attention_key_mask_comes_from_keras_mask(rng):
    ids = keras.Input((None,), dtype="int32")
    x = embedded(ids, "embed")
    layer = RelativeAttention(16, 2)
    implicit = keras.Model(ids, layer(x, x, x))
    explicit = keras.Model(ids, layer(x, x, x, mask=ops.not_equal(ids, 0)))
    data = padded_ids(rng, 4, 7)
    a, b = implicit(data), explicit(data)
    for got, want in zip(a, b):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    values = to_numpy(implicit.get_layer("embed")(data))  # eager: no Keras mask
    unmasked = layer(values, values, values)[0]
    assert np.abs(to_numpy(a[0]) - to_numpy(unmasked)).max() > 1e-3  # it mattered
    # Keras fills `mask` itself when the queries are the only tensor.
    logits_implicit = keras.Model(ids, layer(x))(data)
    np.testing.assert_array_equal(to_numpy(logits_implicit), to_numpy(a[1]))


def test_cross_attention_masks_keys_not_queries(rng):
    """Same lengths on purpose: a query mask mistaken for a key mask would fit."""
    q_ids = keras.Input((None,), dtype="int32")
    k_ids = keras.Input((None,), dtype="int32")
    q, k = embedded(q_ids, "q_embed"), embedded(k_ids, "k_embed")
    plain_k = keras.layers.Embedding(20, 16, name="k_plain")(k_ids)  # no mask
    layer = RelativeAttention(16, 2)
    model = keras.Model([q_ids, k_ids], [
        layer(q, k, k)[0],
        layer(q, k, k, mask=ops.not_equal(k_ids, 0))[0],
        layer(q, plain_k, plain_k)[0],
        layer(q, plain_k, plain_k, mask=ops.ones_like(k_ids, dtype="bool"))[0],
    ])
    model.get_layer("k_plain").set_weights(model.get_layer("k_embed").get_weights())
    qd, kd = padded_ids(rng, 3, 6), padded_ids(rng, 3, 6)
    implicit, explicit, queries_masked_only, all_keys = (to_numpy(o) for o in model([qd, kd]))
    np.testing.assert_array_equal(implicit, explicit)
    np.testing.assert_array_equal(queries_masked_only, all_keys)


def test_explicit_mask_combines_with_the_keras_mask(rng):
    ids = keras.Input((None,), dtype="int32")
    pair_mask = keras.Input((None, None), dtype="bool")
    x = embedded(ids, "embed")
    layer = RelativeAttention(16, 2)
    both = keras.Model([ids, pair_mask], layer(x, x, x, mask=pair_mask)[0])
    key_mask = ops.not_equal(ids, 0)
    manual = keras.Model(
        [ids, pair_mask],
        layer(x, x, x, mask=ops.logical_and(pair_mask, key_mask[:, None, :]),
              content_queries_mask=ops.ones_like(key_mask))[0],
    )
    data, pairs = padded_ids(rng, 3, 5), rng.random((3, 5, 5)) > 0.3
    np.testing.assert_array_equal(to_numpy(both([data, pairs])),
                                  to_numpy(manual([data, pairs])))


def test_pooled_output_carries_the_query_mask(rng):
    ids = keras.Input((None,), dtype="int32")
    x = embedded(ids, "embed")
    pooled, _ = RelativeAttention(16, 2)(x, x, x)
    average = keras.layers.GlobalAveragePooling1D()(pooled)  # mask-aware
    model = keras.Model(ids, [average, pooled])
    data = padded_ids(rng, 4, 6)
    got, per_query = (to_numpy(o) for o in model(data))
    valid = data != 0
    want = (per_query * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- 3. compiled
def positional_model(dropout_p=0.0, mode=("c2c", "c2p", "p2c"), vocab=8):
    ids = keras.Input((None,), dtype="int32", name="ids")
    positions = keras.Input((None, None, 1), dtype="int32", name="positions")
    x = keras.layers.Embedding(vocab, 32)(ids)
    # Content alone needs no table (one would get no gradient).
    content_only = tuple(mode) == ("c2c",)
    table = None if content_only else PositionTable(17, 32, name="table")(x)
    pooled, _ = RelativeAttention(
        32, 4, position_embedding_shape=None if content_only else (None, 32), mode=mode,
        dropout_p=dropout_p, seed=7, name="attention",
    )(x, x, x, relative_positions=positions, position_embedding=table)
    return keras.Model([ids, positions], keras.layers.Dense(vocab)(pooled))


def shift_task(rng, n, length, vocab=8, shift=2):
    """Output the token `shift` places to the left (0 where there is none)."""
    ids = rng.integers(1, vocab, size=(n, length))
    target = np.zeros_like(ids)
    target[:, shift:] = ids[:, :-shift]
    return [ids.astype("int32"), sequence_positions(length, n)], target


def test_compiled_fit_and_predict_with_varying_lengths(rng):
    model = positional_model(dropout_p=0.1)
    traces = []
    layer = model.get_layer("attention")
    original_call = layer.call

    def counting_call(*args, **kwargs):
        traces.append(1)
        return original_call(*args, **kwargs)

    layer.call = counting_call
    jit = BACKEND in ("tensorflow", "jax")  # torch: Keras' default eager path
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    x, y = shift_task(rng, 64, 8)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    if jit:  # 12 steps of one shape: traced once or twice, never per step
        assert len(traces) <= 3, len(traces)
    for length in (5, 11):
        xs, _ = shift_task(rng, 6, length)
        out = model.predict(xs, batch_size=3, verbose=0)
        assert out.shape == (6, length, 8) and np.isfinite(out).all()
    eager = to_numpy(model(shift_task(rng, 2, 5)[0], training=False))
    assert np.isfinite(eager).all()


def test_dropout_under_compiled_training_uses_fresh_masks(rng):
    layer = attention(rng, dropout_p=0.5, seed=11)
    x = rng.normal(size=(2, 4, 16)).astype("float32")
    rp = sequence_positions(4, 1).repeat(2, axis=-1)
    a = to_numpy(layer(x, x, x, relative_positions=rp, training=True)[0])
    b = to_numpy(layer(x, x, x, relative_positions=rp, training=True)[0])
    assert np.abs(a - b).max() > 1e-4  # the SeedGenerator advanced
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_weights]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        @jax.jit
        def step(non_trainable):
            (pooled, _), non_trainable = layer.stateless_call(
                trainable, non_trainable, x, x, x, relative_positions=rp,
                training=True,
            )
            return pooled, non_trainable

        p1, state = step(non_trainable)
        p2, _ = step(state)
        assert np.abs(np.asarray(p1) - np.asarray(p2)).max() > 1e-4


# --------------------------------------------------------- 4. mixed precision
# Measured over 10 seeds per backend (outputs ~1, logits ~2): float16 at most
# 2.1e-3 (pooled) and 2.7e-3 (logits), bfloat16 2.1e-2 and 2.9e-2; the bars
# are 2.5-3x those. A key projection 10% off moves the pooled output by 0.06+.
@pytest.mark.parametrize("policy, atol, logits_atol",
                         [("mixed_float16", 6e-3, 8e-3), ("mixed_bfloat16", 5e-2, 7e-2)])
def test_mixed_precision_is_close_to_float32_and_finite(policy, atol, logits_atol, rng):
    full = attention(rng, n_additional_heads=1)
    half = attention(rng, n_additional_heads=1, dtype=policy)
    full.build(), half.build()
    half.set_weights(full.get_weights())
    assert all(w.dtype == "float32" for w in half.weights)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    mask = np.ones((2, 6, 6), bool)
    mask[0, 1] = False  # a fully masked row: the fill must not overflow
    rp = rng.integers(-6, 7, size=(2, 6, 6, 2)).astype("int32")
    kwargs = dict(mask=mask, relative_positions=rp)
    p32, l32 = (to_numpy(o) for o in full(x, x, x, **kwargs))
    pooled, logits = half(x, x, x, **kwargs)
    assert keras.backend.standardize_dtype(pooled.dtype) == policy.split("_")[1]
    assert keras.backend.standardize_dtype(logits.dtype) == policy.split("_")[1]
    p16, l16 = (to_numpy(o).astype("float32") for o in (pooled, logits))
    assert np.isfinite(p16).all() and np.isfinite(l16).all()
    np.testing.assert_allclose(p16, p32, atol=atol, rtol=0)
    np.testing.assert_allclose(l16, l32, atol=logits_atol, rtol=0)
    # Large logits: the softmax runs in float32 and stays finite.
    big = (x * 30).astype("float32")
    pooled = to_numpy(half(big, big, big, **kwargs)[0])
    assert np.isfinite(pooled.astype("float32")).all()


# ---------------------------------------------------------------- 5. training
def test_gradients_match_finite_differences(rng):
    layer = attention(rng, n_additional_heads=1, bias_initializer="random_normal",
                      position_embedding_trainable=True)
    layer.build()
    x = rng.normal(size=(2, 4, 16)).astype("float32")
    inputs = dict(content_queries=x, content_keys=x, content_values=x,
                  mask=rng.random((2, 4)) > 0.2,
                  relative_positions=rng.integers(-5, 6, size=(2, 4, 4, 2)).astype("int32"))
    r_pooled = rng.normal(size=(2, 4, 16)).astype("float32")
    r_logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")

    def loss_fn(out):
        return ops.sum(ops.multiply(out[0], r_pooled)) + ops.sum(ops.multiply(out[1], r_logits))

    def loss_at(queries):
        return float(to_numpy(loss_fn(layer(**{**inputs, "content_queries": queries}))))

    grads = gradients(layer, loss_fn, inputs)
    eps = 1e-2
    # Directional derivatives along random directions, queries and each weight.
    d = rng.normal(size=x.shape).astype("float32")
    numeric = (loss_at(x + eps * d) - loss_at(x - eps * d)) / (2 * eps)
    np.testing.assert_allclose((grads[0] * d).sum(), numeric, rtol=2e-2, atol=2e-2)
    for weight, grad in zip(layer.trainable_weights, grads[1:]):
        value = to_numpy(weight)
        d = rng.normal(size=value.shape).astype("float32")
        weight.assign(value + eps * d)
        plus = loss_at(x)
        weight.assign(value - eps * d)
        minus = loss_at(x)
        weight.assign(value)
        np.testing.assert_allclose(
            (grad * d).sum(), (plus - minus) / (2 * eps), rtol=2e-2, atol=2e-2,
            err_msg=weight.path,
        )


def test_positional_modes_learn_what_content_alone_cannot(rng):
    """Copy the token two places to the left: c2c has no way to know where
    that is (self-attention without positions is permutation-equivariant)."""
    x, y = shift_task(rng, 1024, 8)
    xt, yt = shift_task(rng, 256, 8)
    accuracy = {}
    for mode in [("c2c",), ("c2c", "c2p", "p2c")]:
        keras.utils.set_random_seed(0)
        model = positional_model(mode=mode)
        model.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=BACKEND != "torch")
        model.fit(x, y, batch_size=64, epochs=12, verbose=0)
        accuracy[mode] = model.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]
    assert accuracy[("c2c", "c2p", "p2c")] > 0.9, accuracy
    assert accuracy[("c2c",)] < 0.45, accuracy


# ------------------------------------------------------------ 6. shared table
def shared_table_model():
    tokens = keras.Input((None, 16), name="tokens")
    positions = keras.Input((None, None, 2), dtype="int32", name="positions")
    table = PositionTable(9, 8, name="table")(tokens)
    x = tokens
    for i in range(3):
        x, _ = RelativeAttention(
            16, 2, n_coordinates=2, position_embedding_shape=(None, 8), name=f"attention_{i}"
        )(x, x, x, relative_positions=positions, position_embedding=table)
    return keras.Model([tokens, positions], x)


def table_weights(model):
    return [w for w in model.weights if tuple(w.shape) == (9, 8)]


def test_shared_table_is_one_trained_weight_before_and_after_saving(rng, tmp_path):
    model = shared_table_model()
    assert len(table_weights(model)) == 1
    data = [rng.normal(size=(8, 5, 16)).astype("float32"),
            rng.integers(-5, 6, size=(8, 5, 5, 2)).astype("int32")]
    target = rng.normal(size=(8, 5, 16)).astype("float32")
    model.compile("adam", "mse")
    before = to_numpy(table_weights(model)[0]).copy()
    model.fit(data, target, epochs=2, batch_size=4, verbose=0)
    assert np.abs(to_numpy(table_weights(model)[0]) - before).max() > 0

    path = str(tmp_path / "shared.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert len(table_weights(loaded)) == 1
    np.testing.assert_array_equal(to_numpy(loaded(data)), to_numpy(model(data)))
    # Still shared after loading: no attention layer came back with a copy.
    for i in range(3):
        assert not loaded.get_layer(f"attention_{i}").owns_table


def test_call_time_table_equals_an_owned_table(rng):
    table = rng.normal(size=(9, 8)).astype("float32")
    owned = attention(rng, position_embedding=table)
    external = RelativeAttention(16, 2, n_coordinates=2, position_embedding_shape=(None, 8))
    owned.build(), external.build()
    external.set_weights([w for w in owned.get_weights() if w.shape != (9, 8)])
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    rp = rng.integers(-6, 7, size=(2, 5, 5, 2)).astype("int32")
    for a, b in zip(owned(x, x, x, relative_positions=rp),
                    external(x, x, x, relative_positions=rp, position_embedding=table)):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-6)
    with pytest.raises(ValueError, match="pass the table at call time"):
        external(x, x, x, relative_positions=rp)


# ---------------------------------------------------------------- 7. adapters
def test_lora_freezes_kernels_and_trains_adapters(rng):
    layer = attention(rng)
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    rp = rng.integers(-6, 7, size=(2, 5, 5, 2)).astype("int32")
    before = to_numpy(layer(x, x, x, relative_positions=rp)[0])
    layer.enable_lora(2)
    names = sorted(w.path.split("/", 1)[1] for w in layer.trainable_weights)
    assert "key/lora_kernel_a" in names and "position_query/lora_kernel_b" in names
    assert not any(n.endswith("/kernel") for n in names)  # base kernels frozen
    np.testing.assert_allclose(to_numpy(layer(x, x, x, relative_positions=rp)[0]), before,
                               atol=1e-6)  # B starts at zero
    inputs = keras.Input((5, 16))
    positions = keras.Input((5, 5, 2), dtype="int32")
    model = keras.Model([inputs, positions],
                        layer(inputs, inputs, inputs, relative_positions=positions)[0])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit([x, rp], np.zeros_like(x), epochs=2, verbose=0)
    assert np.abs(to_numpy(layer(x, x, x, relative_positions=rp)[0]) - before).max() > 1e-4


def test_int8_quantization_of_the_projections(rng):
    inputs = keras.Input((6, 16))
    positions = keras.Input((6, 6, 2), dtype="int32")
    layer = attention(rng, name="attention")
    model = keras.Model([inputs, positions],
                        layer(inputs, inputs, inputs, relative_positions=positions)[0])
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    rp = rng.integers(-6, 7, size=(2, 6, 6, 2)).astype("int32")
    before = to_numpy(model([x, rp]))
    layer.quantize("int8")  # `model.quantize` too, but Keras warns for its InputLayers
    modes = {p.name: p.quantization_mode for p in layer.projections()}
    assert set(modes.values()) == {"int8"}, modes
    after = to_numpy(model([x, rp]))
    assert np.isfinite(after).all()
    # Measured 0.008-0.013 of the largest output over 12 seeds per backend.
    assert np.abs(after - before).max() < 0.025 * np.abs(before).max()
