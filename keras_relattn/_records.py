"""Frozen records of tensors: the state passed between the rooms of the
pooled path, each field named once with its shape.

A record is a frozen dataclass whose fields are tensors, None, tuples of
them, or records. Where a backend needs a flat list (a checkpoint, a
compiled loop, a custom gradient), `flatten` gives its tensors in field
order and a skeleton (the record with each tensor replaced by a marker, no
tensor kept), and `rebuild` puts a list of the same length back.
"""

import dataclasses


class Record:
    """Mixin of the frozen dataclasses of tensors (see the module)."""


_LEAF = "<tensor>"


def flatten(record):
    """`(tensors, skeleton)`: the record's tensors in field order (depth
    first, None skipped) and its structure, holding no tensor."""
    leaves = []

    def walk(value):
        if value is None:
            return None
        if isinstance(value, Record):
            return dataclasses.replace(value, **{
                field.name: walk(getattr(value, field.name))
                for field in dataclasses.fields(value)})
        if isinstance(value, tuple):
            return tuple(walk(item) for item in value)
        leaves.append(value)
        return _LEAF

    return leaves, walk(record)


def rebuild(skeleton, leaves):
    """The record of `skeleton` (from `flatten`) holding `leaves`, in order."""
    items = iter(leaves)

    def build(value):
        if value is None:
            return None
        if isinstance(value, Record):
            return dataclasses.replace(value, **{
                field.name: build(getattr(value, field.name))
                for field in dataclasses.fields(value)})
        if isinstance(value, tuple):
            return tuple(build(item) for item in value)
        return next(items)

    return build(skeleton)
