"""Every invalid construction and call gets a clear error from the layer.

The cases are in error_cases.py, which is also the README's "Errors" table:
`python tests/test_errors.py` prints it in Markdown from the real messages (on
the current backend).
"""

import re

import keras
import pytest

from error_cases import CASES, layer_2d
from keras_relattn import BoxTransformer, RelativeAttention


@pytest.mark.parametrize("case", CASES, ids=[c.situation for c in CASES])
def test_bad_input_raises_a_clear_error(case):
    with pytest.raises(case.error) as info:
        case.run()
    assert case.words in str(info.value)


def test_symbolic_inputs_fail_when_the_model_is_built():
    """Errors come at model construction, before any data flows."""
    q = keras.Input((None, 7))
    with pytest.raises(ValueError, match="query_size"):
        RelativeAttention(8, 2)(q, q, q)
    q = keras.Input((None, 8))
    rp = keras.Input((None, None, 3), dtype="int32")
    with pytest.raises(ValueError, match="n_coordinates"):
        layer_2d()(q, q, q, relative_positions=rp)
    boxes = {k: keras.Input((None,)) for k in ("xmin", "ymin", "xmax", "ymax", "width")}
    with pytest.raises(ValueError, match=r"`boxes` lacks \['height'\]"):
        BoxTransformer(8, n_relative_positions=16)(q, boxes)


def markdown():
    lines = ["| situation | error | message (excerpt) |", "|---|---|---|"]
    for case in CASES:
        try:
            case.run()
        except case.error as e:  # noqa: PERF203
            message = re.sub(r"\s+", " ", str(e)).split("Arguments received")[0]
            message = re.sub(r"Exception encountered when calling \w+\.call\(\)\. ", "",
                             message)
            message = re.sub(r"\x1b\[[0-9;]*m", "", message).strip().replace("|", "\\|")
        lines.append(f"| {case.situation} | `{case.error.__name__}` | {message} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
