"""`python -m keras_relattn`: a short tour of the layer on the current backend.

Builds a functional model around `RelativeAttention` for 1-D text positions,
calls it, saves it to a `.keras` file, loads it back and checks that the
reloaded model gives the same outputs.
"""

import os
import sys
import tempfile

import keras
import numpy as np

from keras_relattn import RelativeAttention


def main():
    rng = np.random.default_rng(0)
    batch, length, size, n_heads, n_positions = 2, 12, 32, 4, 17
    print(f"keras {keras.__version__} on the {keras.backend.backend()} backend")

    table = rng.normal(size=(n_positions, size)).astype("float32")
    attention = RelativeAttention(
        size, n_heads, position_embedding=table, mode=("c2c", "c2p", "p2c"),
        name="relative_attention",
    )
    tokens = keras.Input((None, size), name="tokens")
    mask = keras.Input((None,), dtype="bool", name="mask")
    positions = keras.Input((None, None, 1), dtype="int32", name="positions")
    pooled, logits = attention(
        tokens, tokens, tokens, mask=mask, relative_positions=positions
    )
    model = keras.Model([tokens, mask, positions], [pooled, logits])
    print(f"built a model with {model.count_params()} parameters")

    x = rng.normal(size=(batch, length, size)).astype("float32")
    keep = np.ones((batch, length), bool)
    keep[1, 9:] = False  # the second text is 9 tokens long, then padding
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
    rel = offsets[None, :, :, None].astype("int32")  # key index - query index
    rel = np.repeat(rel, batch, axis=0)
    out, attn = model([x, keep, rel])
    out, attn = keras.ops.convert_to_numpy(out), keras.ops.convert_to_numpy(attn)
    print(f"pooled output {out.shape}, attention logits {attn.shape}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "relative_attention.keras")
        model.save(path)
        print(f"saved to {os.path.basename(path)} ({os.path.getsize(path)} bytes)")
        reloaded = keras.saving.load_model(path)
    out2, attn2 = (keras.ops.convert_to_numpy(t) for t in reloaded([x, keep, rel]))
    diff = max(np.abs(out - out2).max(), np.abs(attn - attn2).max())
    print(f"reloaded: max difference with the original {diff:.2e}")
    if diff != 0.0:
        print("error: the reloaded model differs", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
