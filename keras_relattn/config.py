"""Settings of the pooled path's blocks of queries.

The pooled path (`return_logits=False`) computes the attention one block of
queries at a time, so that no `(batch, heads, queries, keys)` tensor exists
for the whole input, and, for long inputs, recomputes each block in the
backward pass instead of keeping it. The defaults suit each backend; change
them to trade memory for speed, or, in tests, to make a few queries several
blocks:

```python
from keras_relattn import config

with config.block_settings(block_elements=64, recompute_elements=0) as log:
    pooled = layer(x, x, x, return_logits=False)
log.plans  # one BlockPlan per pooled call: its blocks, whether they recompute
```

Under a compiler (`jax.jit`, `tf.function`, `torch.compile`) the settings are
read, and the plan logged, when the call is traced.
"""

import contextlib
import dataclasses
from typing import List, Optional

from keras_relattn import _arguments

__all__ = ["BlockPlan", "BlockSettings", "BlockLog", "block_settings", "get_block_settings"]


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """How the pooled path splits and recomputes.

    Attributes:
        block_elements: the largest `(batch, heads, rows, keys)` block of
            logits held at a time, or None for the backend's default
            (`2**20` on torch eager, where larger fresh buffers cost page
            faults on every call; `2**23` under XLA and `torch.compile`,
            which plan their buffers).
        recompute_elements: inputs whose whole `(batch, heads, queries,
            keys)` logits pass this many elements, and that make several
            blocks, recompute each block in the backward pass (`2**23`:
            32 MiB of float32). Shorter ones keep their blocks.
        flat_index_limit: the table scores are gathered by one flat number
            per (row, position) while their count stays below this (the
            int32 range, `2**31`); beyond it, or where sizes are not known,
            a gather along each row, whose numbers cannot wrap.
        band_rows: queries per block on the banded path (`sequence_positions`),
            or None for the backend's default (at least the table's size):
            its band of keys is about `band_rows + n_positions` wide.
        band_min_keys: the banded path from this many keys on, the
            per-token path (the same numbers) below; None for the
            backend's measured default (`benchmarks/band_crossover.py`),
            1 for the band wherever it fits.
    """

    block_elements: Optional[int] = None
    recompute_elements: int = 2**23
    flat_index_limit: int = 2**31
    band_rows: Optional[int] = None
    band_min_keys: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What one pooled call did, as `BlockLog.plans` lists it.

    Attributes:
        n_queries: the queries of the call, or None where a trace does not
            know them.
        n_blocks: the blocks of queries (1: all at once).
        recomputed: whether each block is recomputed in the backward pass.
        band_width: with `sequence_positions`, the width of the band of keys
            where the position terms were gathered (None: every key).
    """

    n_queries: Optional[int]
    n_blocks: int
    recomputed: bool
    band_width: Optional[int] = None


@dataclasses.dataclass
class BlockLog:
    """The plans of the pooled calls made inside `block_settings`.

    Attributes:
        plans: one `BlockPlan` per pooled call, in the order of the calls.
    """

    plans: List[BlockPlan] = dataclasses.field(default_factory=list)


_settings = [BlockSettings()]
_logs = []


def get_block_settings():
    """The block settings in force: the defaults, or those of the innermost
    `block_settings` block.

    Returns:
        BlockSettings: the settings the next pooled call reads.
    """
    return _settings[-1]


@contextlib.contextmanager
def block_settings(block_elements=None, recompute_elements=None, flat_index_limit=None,
                   band_rows=None, band_min_keys=None):
    """Use other block settings inside a `with` block (the others keep theirs).

    Args:
        block_elements (int | None): see `BlockSettings`.
        recompute_elements (int | None): see `BlockSettings`; 0 recomputes
            every split input.
        flat_index_limit (int | None): see `BlockSettings`.
        band_rows (int | None): see `BlockSettings`.
        band_min_keys (int | None): see `BlockSettings`.

    Yields:
        BlockLog: the log whose `plans` list each pooled call made inside.

    Examples:
        >>> import numpy as np
        >>> from keras_relattn import RelativeAttention, config
        >>> layer = RelativeAttention(8, 2)
        >>> x = np.ones((1, 6, 8), "float32")
        >>> # blocks of 2 queries: batch 1 x heads 2 x rows 2 x keys 6
        >>> with config.block_settings(block_elements=1 * 2 * 2 * 6) as log:
        ...     pooled = layer(x, x, x, return_logits=False)
        >>> log.plans
        [BlockPlan(n_queries=6, n_blocks=3, recomputed=False, band_width=None)]
    """
    changes = {}
    for name, value, low in (("block_elements", block_elements, 1),
                             ("recompute_elements", recompute_elements, 0),
                             ("flat_index_limit", flat_index_limit, 1),
                             ("band_rows", band_rows, 1),
                             ("band_min_keys", band_min_keys, 1)):
        if value is not None:
            value = (_arguments.positive_int(name, value) if low
                     else _arguments.non_negative_int(name, value))
            changes[name] = value
    _settings.append(dataclasses.replace(get_block_settings(), **changes))
    log = BlockLog()
    _logs.append(log)
    try:
        yield log
    finally:
        _settings.pop()
        # By identity: two logs with equal plans are equal dataclasses.
        _logs[:] = [other for other in _logs if other is not log]


def _record(plan):
    """Adds a pooled call's plan to every open `BlockLog`."""
    for log in _logs:
        log.plans.append(plan)
