"""Relative against absolute positions on real images: scikit-learn's digits.

    python examples/digits.py    # trains both models, writes the figures and numbers
    python examples/digits.py --quick      # a shortened run (the test suite's)

Each of the 1,797 8x8 digits bundled with scikit-learn (no download) is a
sequence of 64 pixel tokens. Two small classifiers with the same budget,
seeds, width and depth:

- `relative`: `RelativeTransformerLayer` x2 with 2-D grid positions
  (`positions.grid_positions(8, 8)`, per token), no absolute position at all;
- `absolute`: the same blocks built on Keras `MultiHeadAttention`, with
  learned absolute position embeddings added to the tokens.

Both are scored on the test split and on the test digits translated by 1
and 2 pixels (zero padding; the mean over right, left, down and up), where
relative positions should hold up and absolute ones may not. Writes
`results.json`, `accuracy.png` and `logits.png` into `--out`, and the table of
`docs/examples/digits.md` (between its `<!-- digits -->` marker and the next
blank line).
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIFTS = (0, 1, 2)
WIDTH, HEADS, BLOCKS = 32, 4, 2


def load(seed, n_train=None):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")  # (1797, 8, 8) in [0, 1]
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:500], order[500:]
    if n_train is not None:
        train = train[:n_train]
    return (images[train], digits.target[train]), (images[test], digits.target[test])


def translate(images, dy, dx):
    """Images moved by (dy, dx) pixels, zeros coming in."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    )
    return out


def tokens(images):
    return images.reshape(len(images), 64, 1)


class MHABlock(keras.layers.Layer):
    """`RelativeTransformerLayer`'s block, with Keras MHA inside."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(HEADS, WIDTH // HEADS)
        self.norm = keras.layers.LayerNormalization(epsilon=1e-5)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.linear1 = keras.layers.Dense(2 * WIDTH, activation="gelu")
        self.linear2 = keras.layers.Dense(WIDTH)

    def call(self, x):
        x = self.norm(x + self.attention(x, x))
        return self.norm2(x + self.linear2(self.linear1(x)))


class AbsolutePositions(keras.layers.Layer):
    """Learned absolute position embeddings, one per pixel, added to the
    tokens (BERT's, or ViT's)."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=(input_shape[1], input_shape[2]), initializer="random_normal",
            name="embeddings",
        )

    def call(self, x):
        return x + self.embeddings[None]


def build(kind):
    from keras_relattn import RelativeTransformerLayer, sinusoidal_table
    from keras_relattn.positions import grid_positions

    pixels = keras.Input((64, 1))
    x = keras.layers.Dense(WIDTH)(pixels)
    if kind == "relative":
        grid = grid_positions(8, 8)
        for i in range(BLOCKS):
            x = RelativeTransformerLayer(
                WIDTH, HEADS, n_coordinates=2, init_resweight=1.0,
                position_embedding=sinusoidal_table(32, WIDTH), name=f"block{i}",
            )(x, positions=grid, return_logits=False)
    else:
        x = AbsolutePositions()(x)
        for i in range(BLOCKS):
            x = MHABlock(name=f"block{i}")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(pixels, keras.layers.Dense(10)(x), name=kind)


def accuracy(model, images, labels):
    logits = model.predict(tokens(images), verbose=0)
    predicted = np.argmax(keras.ops.convert_to_numpy(logits), -1)
    return float(np.mean(predicted == labels))


def shifted_accuracy(model, images, labels, shift):
    if shift == 0:
        return accuracy(model, images, labels)
    moves = [(0, shift), (0, -shift), (shift, 0), (-shift, 0)]
    return float(np.mean([accuracy(model, translate(images, dy, dx), labels)
                          for dy, dx in moves]))


def run(epochs, n_train, seed):
    (x_train, y_train), (x_test, y_test) = load(seed, n_train)
    results = {"epochs": epochs, "train_images": len(x_train),
               "test_images": len(x_test), "seed": seed,
               "backend": keras.backend.backend(), "models": {}}
    models = {}
    for kind in ("relative", "absolute"):
        keras.utils.set_random_seed(seed)
        model = build(kind)
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start = time.perf_counter()
        history = model.fit(tokens(x_train), y_train, batch_size=64, epochs=epochs,
                            verbose=0)
        seconds = time.perf_counter() - start
        results["models"][kind] = {
            "parameters": int(model.count_params()),
            "train_seconds": round(seconds, 1),
            "loss": [round(float(loss), 4) for loss in history.history["loss"]],
            "accuracy": {str(s): shifted_accuracy(model, x_test, y_test, s)
                         for s in SHIFTS},
        }
        models[kind] = model
    return results, models, (x_test, y_test)


def plot(results, models, test, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for kind, style in (("relative", "o-"), ("absolute", "s--")):
        acc = results["models"][kind]["accuracy"]
        ax.plot(SHIFTS, [acc[str(s)] for s in SHIFTS], style, label=kind)
    ax.set_xticks(SHIFTS)
    ax.set_xlabel("test digits translated by (pixels)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("digits: relative vs absolute positions")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=110)
    plt.close(fig)

    # The logits of one head of the relative model's first block, for one
    # test digit: the query pixel at the centre, over the 8x8 keys.
    from keras_relattn.positions import grid_positions

    images, labels = test
    model = models["relative"]
    block = model.get_layer("block0")
    x = model.layers[1](tokens(images[:1]))  # the pixel projection
    _, logits = block(x, positions=grid_positions(8, 8))
    logits = keras.ops.convert_to_numpy(logits)[0]  # (queries, keys, heads)
    query = 3 * 8 + 4
    fig, axes = plt.subplots(1, HEADS + 1, figsize=(2.1 * (HEADS + 1), 2.3))
    axes[0].imshow(images[0], cmap="gray_r")
    axes[0].plot(4, 3, "r+", markersize=12)
    axes[0].set_title(f"digit {labels[0]}")
    for h in range(HEADS):
        axes[h + 1].imshow(logits[query, :, h].reshape(8, 8), cmap="viridis")
        axes[h + 1].plot(4, 3, "r+", markersize=12)
        axes[h + 1].set_title(f"head {h}")
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("first block's logits from the marked pixel", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "logits.png"), dpi=110)
    plt.close(fig)


def table(results):
    lines = [
        "| model | parameters | train s | test accuracy | translated 1 px "
        "| translated 2 px |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in results["models"].items():
        acc = r["accuracy"]
        lines.append(f"| {kind} | {r['parameters']} | {r['train_seconds']} | "
                     f"{acc['0']:.3f} | {acc['1']:.3f} | {acc['2']:.3f} |")
    return "\n".join(lines)


def write_table(results, page):
    with open(page) as f:
        lines = f.read().split("\n")
    start = lines.index("<!-- digits -->") + 1
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1
    lines[start:end] = table(results).split("\n")
    with open(page, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "examples"))
    p.add_argument("--quick", action="store_true",
                   help="4 epochs on 300 images, no table")
    args = p.parse_args(argv)
    epochs, n_train = (4, 300) if args.quick else (args.epochs, None)
    os.makedirs(args.out, exist_ok=True)
    results, models, test = run(epochs, n_train, args.seed)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, models, test, args.out)
    if not args.quick:
        write_table(results, os.path.join(ROOT, "docs", "examples", "digits.md"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
