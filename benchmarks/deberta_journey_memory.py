"""Peak memory growth of one training step at 8192 tokens of a model loaded
with `deberta.from_pretrained` (issue 38, item 4), float32 and
mixed_bfloat16, each backend in its own fresh process.

    python benchmarks/deberta_journey_memory.py            # every backend and dtype
    python benchmarks/deberta_journey_memory.py --length 4096

The checkpoint: a random DeBERTa-v3 classifier (hidden 128, 4 heads, 2
layers, v3's 256 buckets over 512 positions) saved by transformers into a
temporary folder. Each point: the model loaded, compiled and its input built,
then, for each of two `train_on_batch` of one document (the first traces
and compiles), the process's peak RSS reset (`/proc/self/clear_refs`) and the
step run: its growth is the new peak minus the RSS before the step.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POINT = r"""
import json, sys, time
import keras_relattn  # noqa: F401
import keras
import numpy as np
from keras_relattn import deberta

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB

folder, length, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = deberta.from_pretrained(folder, "sequence_classification", dtype=dtype)
model.compile(keras.optimizers.Adam(1e-4),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
ids = np.random.default_rng(0).integers(3, 1000, size=(1, length)).astype("int32")
inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
labels = np.array([1])
point = {"backend": keras.backend.backend(), "dtype": dtype, "length": length}
for step in ("first_step", "second_step"):  # the first traces and compiles
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from the current RSS
    before = status("VmRSS")
    start = time.perf_counter()
    loss = model.train_on_batch(inputs, labels)
    point[step] = {"seconds": round(time.perf_counter() - start, 1),
                   "loss_finite": bool(np.isfinite(loss)),
                   "peak_growth_mib": round(status("VmHWM") - before, 1)}
print(json.dumps(point))
"""


def checkpoint():
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=512, relative_attention=True,
        position_buckets=256, max_relative_positions=512, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
        type_vocab_size=0, num_labels=2)
    folder = tempfile.mkdtemp()
    DebertaV2ForSequenceClassification(config).save_pretrained(folder)
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--backends", nargs="+", default=["torch", "jax", "tensorflow"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "mixed_bfloat16"])
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks",
                                                  "deberta_journey_memory.json"))
    args = p.parse_args(argv)
    folder = checkpoint()
    points = []
    for backend in args.backends:
        for dtype in args.dtypes:
            done = subprocess.run(
                [sys.executable, "-c", POINT, folder, str(args.length), dtype],
                capture_output=True, text=True, timeout=900, cwd=ROOT,
                env=dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2"))
            if done.returncode != 0:
                point = {"backend": backend, "dtype": dtype, "length": args.length,
                         "error": done.stderr.strip().splitlines()[-1:]}
            else:
                point = json.loads(done.stdout.strip().splitlines()[-1])
            points.append(point)
            print(point, flush=True)
    with open(args.json, "w") as f:
        json.dump(points, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
