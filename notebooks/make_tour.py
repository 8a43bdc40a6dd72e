"""Writes notebooks/tour.ipynb (unexecuted); tests/test_notebook.py runs it.

    python notebooks/make_tour.py && python notebooks/make_tour.py --execute
"""

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "tour.ipynb")

CELLS = [
    ("md", """# A tour of keras-relattn

`RelativeAttention` is DeBERTa-style *disentangled* attention: the logit between a query and
a key sums a content-to-content term (c2c) and two terms that look up the key's position
*relative to the query* in a table (c2p, p2c). This notebook runs top to bottom on a CPU in a
couple of minutes:

1. a 1-D toy task where relative position matters: `c2c` alone cannot learn it, the
   positional modes can;
2. a 2-D example on a grid of image patches;
3. saving and reloading a `.keras` model;
4. porting an edspdf checkpoint, both ways;
5. the attention logits per head, plotted."""),
    ("code", """import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quieter TensorFlow start-up

import keras
import matplotlib.pyplot as plt
import numpy as np

from keras_relattn import PositionTable, RelativeAttention
from keras_relattn.positions import grid_relative_positions, sequence_relative_positions

print("keras", keras.__version__, "backend", keras.backend.backend())
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)"""),
    ("md", """## 1. A task that needs relative position

Copy the token two places to the left (0 where there is none). Self-attention over content
alone is permutation-equivariant: it cannot tell which token is two to the left. The
positional terms can: the c2p term lets a query look for "the key at offset -2"."""),
    ("code", """VOCAB, LENGTH = 8, 12

def shift_task(n, length=LENGTH):
    ids = rng.integers(1, VOCAB, size=(n, length)).astype("int32")
    target = np.zeros_like(ids)
    target[:, 2:] = ids[:, :-2]
    positions = np.broadcast_to(
        keras.ops.convert_to_numpy(sequence_relative_positions(length)), (n, length, length, 1))
    return [ids, positions.astype("int32")], target

def make_model(mode):
    ids = keras.Input((None,), dtype="int32")
    positions = keras.Input((None, None, 1), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 32)(ids)
    if mode == ("c2c",):  # content only: no table, the positions are unused
        pooled, logits = RelativeAttention(32, 4, mode=mode, name="attention")(
            x, x, x, relative_positions=positions)
    else:
        table = PositionTable(17, 32, name="table")(x)
        pooled, logits = RelativeAttention(
            32, 4, mode=mode, position_embedding_shape=(None, 32), name="attention"
        )(x, x, x, relative_positions=positions, position_embedding=table)
    model = keras.Model([ids, positions], keras.layers.Dense(VOCAB)(pooled))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model

train, train_y = shift_task(2048)
test, test_y = shift_task(512)
accuracy = {}
models = {}
for mode in [("c2c",), ("c2c", "c2p", "p2c"), ("c2p", "p2c")]:
    models[mode] = model = make_model(mode)
    model.fit(train, train_y, batch_size=64, epochs=10, verbose=0)
    accuracy["+".join(mode)] = model.evaluate(test, test_y, verbose=0, return_dict=True)["accuracy"]
for name, acc in accuracy.items():
    print(f"{name:12} test accuracy {acc:.2f}")"""),
    ("code", """fig, ax = plt.subplots(figsize=(5, 2.5))
ax.bar(list(accuracy), list(accuracy.values()), color=["grey", "tab:blue", "tab:green"])
ax.set_ylabel("test accuracy")
ax.set_ylim(0, 1)
ax.set_title("copy the token two places to the left")
plt.show()"""),
    ("md", """## 2. Two coordinates: a grid of patches

`grid_relative_positions(h, w)` gives each pair of patches its (column, row) offset. Task: each
patch outputs the token of the patch right *above* it (0 on the first row). One coordinate per
chunk of each head: `n_coordinates=2`."""),
    ("code", """H, W = 4, 5
grid_positions = keras.ops.convert_to_numpy(grid_relative_positions(H, W))

def grid_task(n):
    ids = rng.integers(1, VOCAB, size=(n, H, W)).astype("int32")
    target = np.zeros_like(ids)
    target[:, 1:] = ids[:, :-1]
    rel = np.broadcast_to(grid_positions, (n, H * W, H * W, 2)).astype("int32")
    return [ids.reshape(n, H * W), rel], target.reshape(n, H * W)

ids = keras.Input((None,), dtype="int32")
positions = keras.Input((None, None, 2), dtype="int32")
x = keras.layers.Embedding(VOCAB, 32)(ids)
pooled = RelativeAttention(32, 4, n_coordinates=2, position_embedding_shape=(9, 32),
                           position_embedding_trainable=True)(
    x, x, x, relative_positions=positions, return_logits=False)  # logits unused: fast path
grid_model = keras.Model([ids, positions], keras.layers.Dense(VOCAB)(pooled))
grid_model.compile(keras.optimizers.Adam(1e-2),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
grid_train, grid_train_y = grid_task(2048)
grid_test, grid_test_y = grid_task(256)
grid_model.fit(grid_train, grid_train_y, batch_size=64, epochs=8, verbose=0)
print("2-D test accuracy:",
      round(grid_model.evaluate(grid_test, grid_test_y, verbose=0, return_dict=True)["accuracy"], 2))"""),
    ("md", """## 3. Save and reload

The layer and its shared `PositionTable` are ordinary Keras objects: `model.save` writes
them to a `.keras` file, and `keras.saving.load_model` (safe mode) brings back one table."""),
    ("code", """model = models[("c2c", "c2p", "p2c")]
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "shift.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
same = np.array_equal(model.predict(test, verbose=0), reloaded.predict(test, verbose=0))
print("identical predictions after reloading:", same)
print("tables:", [w.path for w in reloaded.weights if w.path.startswith("table")])"""),
    ("md", """## 4. Porting an edspdf checkpoint

Build our layer with the same arguments as the edspdf module and load its `state_dict`;
`edspdf_state_dict` goes the other way. (edspdf and torch are test-time dependencies.)"""),
    ("code", """import torch
from edspdf.layers.relative_attention import RelativeAttention as EdspdfAttention
from keras_relattn import edspdf_state_dict, load_edspdf_state_dict

theirs = EdspdfAttention(32, 4, position_embedding=torch.randn(17, 32), n_coordinates=2).eval()
ours = RelativeAttention(32, 4, position_embedding_shape=(17, 32), n_coordinates=2)
load_edspdf_state_dict(ours, theirs.state_dict())

x = rng.normal(size=(2, 6, 32)).astype("float32")
keep = np.ones((2, 6), bool)
rel = rng.integers(-8, 9, size=(2, 6, 6, 2))
with torch.no_grad():
    want = theirs(*(torch.tensor(a) for a in (x, x, x, keep)), relative_positions=torch.tensor(rel))
got = ours(x, x, x, mask=keep, relative_positions=rel)
print("max |ours - edspdf|:",
      max(float(np.abs(keras.ops.convert_to_numpy(g) - w.numpy()).max()) for g, w in zip(got, want)))
theirs.load_state_dict({k: torch.from_numpy(v) for k, v in edspdf_state_dict(ours).items()})
print("exported back into edspdf: ok")"""),
    ("md", """## 5. What the heads look at

The logits of the trained 1-D model for one sentence, per head. The positional heads light up
along the diagonal two places to the left of each query."""),
    ("code", """# A model that exposes the attention layer's second output, the logits.
logits_model = keras.Model(model.inputs, model.get_layer("attention").output[1])
logits = logits_model.predict([a[:1] for a in test], verbose=0)[0]  # (queries, keys, heads)
fig, axes = plt.subplots(1, logits.shape[-1], figsize=(12, 3))
for h, ax in enumerate(axes):
    ax.imshow(logits[:, :, h], cmap="viridis")
    ax.set_title(f"head {h}")
    ax.set_xlabel("key")
axes[0].set_ylabel("query")
fig.suptitle("attention logits, c2c + c2p + p2c, copy-two-left task")
fig.tight_layout()
if os.path.isdir(os.path.join("..", "docs")):  # the README shows this picture
    fig.savefig(os.path.join("..", "docs", "attention_heads.png"), dpi=90)
plt.show()"""),
]


def build():
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    return nb


def execute(nb, cwd=HERE, timeout=600):
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    return nb


if __name__ == "__main__":
    nb = build()
    if "--execute" in sys.argv:
        execute(nb)
    nbformat.write(nb, PATH)
    print("wrote", PATH)
