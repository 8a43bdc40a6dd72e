"""Property tests: random configurations and inputs against the NumPy reference."""

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import to_numpy
from keras_relattn import RelativeAttention
from reference import reference_attention, weights_of

MODES = [
    m for r in (1, 2, 3) for m in itertools.combinations(("c2c", "c2p", "p2c"), r)
]


@st.composite
def configurations(draw):
    n_heads = draw(st.integers(1, 3))
    n_coords = draw(st.integers(1, 3))
    chunk = draw(st.integers(1, 3))
    head_size = n_coords * chunk
    value_head = draw(st.integers(1, 3))
    table = draw(st.booleans())
    mode = draw(st.sampled_from(MODES if table else [("c2c",)]))
    same = draw(st.sampled_from(["no", "all", "positional"]))
    query_size = draw(st.integers(1, 6))
    ctor = dict(
        size=n_heads * value_head, n_heads=n_heads, head_size=head_size,
        query_size=query_size,
        key_size=query_size if same == "all" else draw(st.integers(1, 6)),
        value_size=draw(st.integers(1, 6)), n_coordinates=n_coords, mode=mode,
        n_additional_heads=draw(st.integers(0, 2)),
        head_bias=draw(st.booleans()),
        same_key_query_proj=same == "all",
        same_positional_key_query_proj=same == "positional",
        bias_initializer="random_normal",
    )
    if table:
        ctor["position_embedding_shape"] = (
            draw(st.integers(1, 9)), n_coords * draw(st.integers(1, 3))
        )
    return ctor


@settings(
    max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ctor=configurations(), data=st.data())
def test_layer_matches_reference(ctor, data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    layer = RelativeAttention(**ctor, seed=seed)
    layer.build()
    if layer.position_embedding_shape is not None:
        layer.position_embedding.assign(
            rng.normal(size=layer.position_embedding_shape).astype("float32")
        )
    if layer.use_head_bias:
        layer.head_bias.assign(rng.normal(size=layer.head_bias.shape).astype("float32"))
    config = layer.get_config()

    b, nq = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    cross = data.draw(st.booleans()) or ctor["query_size"] != ctor["key_size"]
    nk = data.draw(st.integers(1, 5)) if cross else nq
    x = ctor["n_coordinates"]
    f32 = lambda *s: rng.normal(size=s).astype("float32")  # noqa: E731
    inputs = dict(content_queries=f32(b, nq, ctor["query_size"]))
    if cross:
        inputs["content_keys"] = f32(b, nk, ctor["key_size"])
    if data.draw(st.booleans()):
        inputs["content_values"] = f32(b, nk, ctor["value_size"])
        mask_rank = data.draw(st.sampled_from([0, 2, 3, 4]))
        shape = {2: (b, nk), 3: (b, nq, nk), 4: (b, nq, nk, ctor["n_heads"])}
        if mask_rank:
            inputs["mask"] = rng.random(shape[mask_rank]) > 0.3
    if "position_embedding_shape" in ctor and data.draw(st.booleans()) or (
        "c2c" not in ctor["mode"]
    ):
        pb = data.draw(st.sampled_from([1, b]))
        dtype = data.draw(st.sampled_from(["int32", "int64"]))
        inputs["relative_positions"] = rng.integers(
            -12, 13, size=(pb, nq, nk, x)
        ).astype(dtype)
        if data.draw(st.booleans()):
            inputs["no_position_mask"] = rng.random((pb, nq, nk)) > 0.5
    if data.draw(st.booleans()):
        inputs["base_attn"] = f32(b, nq, nk, layer.total_heads)

    expected = reference_attention(
        weights_of(layer), config,
        inputs["content_queries"], inputs.get("content_keys"),
        inputs.get("content_values"), inputs.get("mask"),
        inputs.get("relative_positions"), inputs.get("no_position_mask"),
        inputs.get("base_attn"),
    )
    ours = layer(**inputs)
    if not isinstance(expected, tuple):
        expected, ours = (expected,), (ours,)
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(to_numpy(got), want, atol=2e-4, rtol=1e-4)
