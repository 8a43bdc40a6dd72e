"""The parity cases: named configurations of `RelativeAttention` and its
inputs, run against the real edspdf (test_parity.py) and through the
pooled-only path (test_pooled.py)."""

import dataclasses
import itertools
from typing import Optional

ALL_MODES = [
    modes
    for r in (1, 2, 3)
    for modes in itertools.combinations(("c2c", "c2p", "p2c"), r)
]


@dataclasses.dataclass(frozen=True)
class ParityCase:
    size: int = 16
    n_heads: int = 2
    n_positions: int = 9  # rows of the table
    n_coordinates: int = 1
    # The table is (n_positions, this x n_coordinates): a multiple of the
    # coordinates, as edspdf requires.
    position_features_per_coordinate: int = 6
    batch: int = 3
    n_queries: int = 5
    n_keys: int = 5  # with `cross` only; else n_queries
    cross: bool = False  # keys (and their sizes) other than the queries
    query_size: Optional[int] = None
    key_size: Optional[int] = None
    value_size: Optional[int] = None
    table: bool = True
    positions: bool = True
    position_batch: Optional[int] = None  # 1: positions broadcast over the batch
    position_range: int = 6  # offsets drawn in [-range, range]
    mask: str = "keys"  # "keys", "int", "3d" or "4d"
    no_position_mask: bool = False
    base_attn: bool = False
    values: bool = True
    ctor: dict = dataclasses.field(default_factory=dict)  # more constructor kwargs


CASES = {
    "default_1d": ParityCase(),
    "two_coordinates": ParityCase(n_coordinates=2),
    "three_coordinates": ParityCase(n_coordinates=3, size=24, n_heads=2),
    "cross_attention_sizes": ParityCase(
        cross=True, n_queries=4, n_keys=7, query_size=12, key_size=20,
        value_size=10, size=16,
    ),
    "cross_2d": ParityCase(cross=True, n_queries=6, n_keys=3, n_coordinates=2),
    "head_size_not_default": ParityCase(ctor=dict(head_size=6), n_coordinates=2),
    "head_size_3coords": ParityCase(ctor=dict(head_size=12), n_coordinates=3),
    "same_key_query_proj": ParityCase(ctor=dict(same_key_query_proj=True)),
    "same_positional_proj": ParityCase(
        ctor=dict(same_positional_key_query_proj=True), n_coordinates=2
    ),
    "additional_heads": ParityCase(ctor=dict(n_additional_heads=2), n_coordinates=2),
    "no_head_bias": ParityCase(ctor=dict(head_bias=False)),
    "mask_3d": ParityCase(mask="3d"),
    "mask_4d": ParityCase(mask="4d", ctor=dict(n_additional_heads=1)),
    "mask_int": ParityCase(mask="int"),
    "no_position_mask": ParityCase(no_position_mask=True, n_coordinates=2),
    "base_attn": ParityCase(base_attn=True, ctor=dict(n_additional_heads=1)),
    "clamped_positions": ParityCase(position_range=40),
    "even_table": ParityCase(n_positions=8, position_range=12),
    "one_position": ParityCase(n_positions=1),
    "positions_batch_1": ParityCase(position_batch=1, n_coordinates=2),
    "logits_only": ParityCase(values=False, ctor=dict(do_pooling=False)),
    "logits_only_with_pooling_layer": ParityCase(values=False),
    "positions_not_given": ParityCase(positions=False),
    "no_table_c2c": ParityCase(table=False, positions=False, ctor=dict(mode=("c2c",))),
    "dropout_inference": ParityCase(ctor=dict(dropout_p=0.3)),
    "trainable_table": ParityCase(n_coordinates=2, ctor=dict(position_embedding_trainable=True)),
    "batch_1": ParityCase(batch=1, n_queries=1, n_keys=1),
    "shared_position_proj_p2c": ParityCase(
        ctor=dict(mode=("c2c", "p2c"), same_positional_key_query_proj=True),
        n_coordinates=2,
    ),
}
for modes in ALL_MODES:
    CASES["mode_" + "_".join(modes)] = ParityCase(ctor=dict(mode=modes), n_coordinates=2)


def make_case(rng, case):
    """The layer arguments and random inputs of `case`: `(size, n_heads,
    table, constructor kwargs, call inputs)`."""
    spec = dataclasses.asdict(case)
    size, n_heads = spec["size"], spec["n_heads"]
    query_size = spec["query_size"] or size
    key_size = spec["key_size"] or size
    value_size = spec["value_size"] or key_size
    b, nq = spec["batch"], spec["n_queries"]
    nk = spec["n_keys"] if spec["cross"] else nq
    x = spec["n_coordinates"]
    ctor = dict(spec["ctor"])
    ctor.update(
        query_size=spec["query_size"], key_size=spec["key_size"],
        value_size=spec["value_size"], n_coordinates=x,
    )
    n_add = ctor.get("n_additional_heads", 0)
    table = None
    if spec["table"]:
        width = spec["position_features_per_coordinate"] * x
        table = rng.normal(size=(spec["n_positions"], width)).astype("float32")
    f32 = lambda *shape: rng.normal(size=shape).astype("float32")  # noqa: E731
    inputs = dict(content_queries=f32(b, nq, query_size))
    inputs["content_keys"] = f32(b, nk, key_size) if spec["cross"] else None
    inputs["content_values"] = f32(b, nk, value_size) if spec["values"] else None
    mask = {
        "keys": lambda: rng.random((b, nk)) > 0.3,
        "int": lambda: (rng.random((b, nk)) > 0.3).astype("int32"),
        "3d": lambda: rng.random((b, nq, nk)) > 0.3,
        "4d": lambda: rng.random((b, nq, nk, n_heads)) > 0.3,
    }[spec["mask"]]()
    inputs["mask"] = mask
    if spec["positions"]:
        pb = spec["position_batch"] or b
        r = spec["position_range"]
        inputs["relative_positions"] = rng.integers(-r, r + 1, size=(pb, nq, nk, x))
    else:
        inputs["relative_positions"] = None
    inputs["no_position_mask"] = (
        rng.random((b, nq, nk)) > 0.6 if spec["no_position_mask"] else None
    )
    inputs["base_attn"] = (
        f32(b, nq, nk, n_heads + n_add) if spec["base_attn"] else None
    )
    return size, n_heads, table, ctor, inputs


