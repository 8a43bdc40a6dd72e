"""Long documents on a DeBERTa-v3 checkpoint: what 4096 tokens learn, 512 cannot.

    python examples/long_documents.py          # the page's figure and numbers
    python examples/long_documents.py --quick  # a shortened run (the test suite's)

A synthetic document classification (nothing downloaded). Each document of
4096 tokens is filler text (two words at random) with two facts in it,
thousands of tokens apart:

- near the start (within the first 512 tokens), a run of 192 tokens of one of
  two "subject" words, the positive one with probability 1/sqrt(2);
- near the end (within the last 1024 tokens), a run of 192 tokens of one of
  two "verdict" words, the positive one with probability 1/sqrt(2).

The label is whether both are positive (half the documents). A model that
reads 512 tokens (the document truncated, as a tokenizer does) never sees
the verdict: at best it says "no" for a negative subject and "yes" for a
positive one, right on 1 - 1/sqrt(2) + 1/2 = 0.79 of the documents. One that
reads the whole document can be right on all of them.

The model: a small random DeBERTa-v3 made by transformers (`DebertaV2Config`,
`DebertaV2ForSequenceClassification.save_pretrained` into a temporary folder,
as a real checkpoint would be), loaded with
`deberta.from_pretrained(folder, task="sequence_classification")` and
fine-tuned twice, the same steps and seeds, at 512 and at 4096 tokens. Then
one training step of the same model is timed against KerasHub's
`DebertaV3TextClassifier` of the same size (random weights) at the lengths
where KerasHub's whole `(tokens, tokens)` attention still fits in a few
seconds.

Runs on the torch backend unless KERAS_BACKEND says otherwise: on this
project's 2-core CPU its training step is the fastest of the three backends
(8 documents: 0.17 s at 512 tokens against TensorFlow's 0.44 and JAX's 0.57;
7 s at 4096 against JAX's 18). Writes `long_documents.json` and
`long_documents.png` into `--out`, and the table of
`docs/examples/long_documents.md` (between its `<!-- long_documents -->`
marker and the next blank line).
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault(
    "KERAS_BACKEND", "torch"
)  # the fastest on a CPU here (see above)

import keras_relattn  # noqa: F401, E402  (first: before transformers loads torch)

import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCABULARY, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 100, 32, 2, 2, 64
BUCKETS, MAX_POSITION = 64, 512
PAD, CLS, SEP = 0, 1, 2
SHORT, LONG = 512, 4096
SUBJECTS, VERDICTS = (3, 4), (5, 6)  # the two facts' words: (negative, positive)
FILLER = (10, 11)  # the text around them
POSITIVE = 0.5**0.5  # each fact's chance: both positive on half the documents


def documents(n, seed, length, short):
    """`(token_ids, labels)`: `n` documents of `length` tokens, `[CLS]` first,
    `[SEP]` last, the subject within the first `short` tokens and the verdict
    in the last quarter; the label is whether both are positive."""
    rng = np.random.default_rng(seed)
    span = length * 3 // 64  # 192 tokens at 4096
    ids = rng.choice(np.array(FILLER, "int32"), size=(n, length))
    ids[:, 0], ids[:, -1] = CLS, SEP
    subject = (rng.random(n) < POSITIVE).astype("int32")
    verdict = (rng.random(n) < POSITIVE).astype("int32")
    for i in range(n):
        start = rng.integers(1, short - 1 - span)
        ids[i, start : start + span] = SUBJECTS[subject[i]]
        end = rng.integers(length - length // 4, length - 1 - span)
        ids[i, end : end + span] = VERDICTS[verdict[i]]
    return ids, subject & verdict


def truncated(ids, length):
    """The first `length` tokens, `[SEP]` last, as a tokenizer truncates."""
    out = ids[:, :length].copy()
    out[:, -1] = SEP
    return out


def inputs(ids):
    return {"token_ids": ids, "padding_mask": (ids != PAD).astype("int32")}


def checkpoint_folder(seed):
    """A random DeBERTa-v3 classifier saved by transformers, as from the hub."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    config = DebertaV2Config(
        vocab_size=VOCABULARY,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITION,
        relative_attention=True,
        position_buckets=BUCKETS,
        max_relative_positions=MAX_POSITION,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        type_vocab_size=0,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    folder = tempfile.mkdtemp(prefix="deberta_v3_small_")
    DebertaV2ForSequenceClassification(config).save_pretrained(folder)
    return folder


def load(folder, seed):
    from keras_relattn import deberta

    keras.utils.set_random_seed(seed)
    model = deberta.from_pretrained(folder, task="sequence_classification")
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def accuracy(model, ids, labels, batch_size):
    logits = model.predict(inputs(ids), batch_size=batch_size, verbose=0)
    return float(
        np.mean(np.argmax(keras.ops.convert_to_numpy(logits), -1) == labels)
    )


def fine_tune(folder, length, data, steps, batch_size, evaluations, seed):
    """Trains a fresh load of the checkpoint at `length` tokens; the test
    accuracy at `evaluations + 1` points and the seconds per step."""
    (train_ids, train_labels), (test_ids, test_labels) = data
    train_ids, test_ids = truncated(train_ids, length), truncated(test_ids, length)
    model = load(folder, seed)
    every = max(1, steps // evaluations)
    curve = [(0, accuracy(model, test_ids, test_labels, batch_size))]
    bar = keras.utils.Progbar(steps, stateful_metrics=["test accuracy"])
    order = np.random.default_rng(seed).permutation(steps * batch_size) % len(
        train_ids
    )
    seconds = 0.0
    for step in range(1, steps + 1):
        batch = order[(step - 1) * batch_size : step * batch_size]
        start = time.perf_counter()
        loss = model.train_on_batch(inputs(train_ids[batch]), train_labels[batch])
        seconds += (
            time.perf_counter() - start if step > 1 else 0.0
        )  # the first compiles
        values = [("loss", float(np.asarray(loss).reshape(-1)[0]))]
        if step % every == 0 or step == steps:
            curve.append((step, accuracy(model, test_ids, test_labels, batch_size)))
            values.append(("test accuracy", curve[-1][1]))
        bar.update(step, values)
    return {
        "curve": curve,
        "final_accuracy": curve[-1][1],
        "seconds_per_step": round(seconds / max(steps - 1, 1), 3),
    }


def keras_hub_classifier(seed):
    from keras_hub.models import DebertaV3Backbone, DebertaV3TextClassifier

    keras.utils.set_random_seed(seed)
    backbone = DebertaV3Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=LAYERS,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        max_sequence_length=MAX_POSITION,
        bucket_size=BUCKETS,
        dropout=0.0,
    )
    model = DebertaV3TextClassifier(
        backbone, num_classes=2, hidden_dim=HIDDEN, dropout=0.0
    )
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def step_seconds(model, length, batch_size, repeats):
    """The median seconds of one `train_on_batch` (after one to compile)."""
    ids, labels = documents(batch_size, seed=1, length=length, short=length)
    model.train_on_batch(inputs(ids), labels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train_on_batch(inputs(ids), labels)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)), 3)


def timings(folder, lengths, batch_size, repeats, seed):
    """One training step of this package's model and KerasHub's, per length."""
    ours, theirs = load(folder, seed), keras_hub_classifier(seed)
    rows = []
    for length in lengths:
        rows.append(
            {
                "length": length,
                "keras_relattn": step_seconds(ours, length, batch_size, repeats),
                "keras_hub": step_seconds(theirs, length, batch_size, repeats),
            }
        )
        print(f"one step at {length} tokens: {rows[-1]}", flush=True)
    return rows


def run(args):
    quick = args.quick
    short, long = (128, 512) if quick else (SHORT, LONG)
    n_train, n_test = (
        (16, 16) if quick else (args.train_documents, args.test_documents)
    )
    steps = 3 if quick else args.steps
    data = (
        documents(n_train, args.seed, long, short),
        documents(n_test, args.seed + 1, long, short),
    )
    folder = checkpoint_folder(args.seed)
    results = {
        "backend": keras.backend.backend(),
        "seed": args.seed,
        "steps": steps,
        "batch_size": args.batch_size,
        "train_documents": n_train,
        "test_documents": n_test,
        "short": short,
        "long": long,
        "model": dict(
            vocab_size=VOCABULARY,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            position_buckets=BUCKETS,
            max_relative_positions=MAX_POSITION,
        ),
        "fine_tuning": {},
    }
    for length in (short, long):
        print(f"fine-tuning at {length} tokens", flush=True)
        results["fine_tuning"][str(length)] = fine_tune(
            folder,
            length,
            data,
            steps,
            args.batch_size,
            2 if quick else args.evaluations,
            args.seed,
        )
    lengths = (short,) if quick else tuple(args.keras_hub_lengths)
    results["step_seconds"] = timings(
        folder, lengths, args.batch_size, 1 if quick else 2, args.seed
    )
    results[
        "step_seconds"
    ].append(  # ours at the long length: the fine-tuning's steps
        {
            "length": long,
            "keras_hub": None,
            "keras_relattn": results["fine_tuning"][str(long)]["seconds_per_step"],
        }
    )
    return results


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for length, style in (
        (str(results["short"]), "s--"),
        (str(results["long"]), "o-"),
    ):
        steps, acc = zip(*results["fine_tuning"][length]["curve"])
        left.plot(steps, acc, style, label=f"{length} tokens")
    left.axhline(0.5, color="gray", lw=0.8, ls=":")
    left.set_xlabel("training steps")
    left.set_ylabel("test accuracy")
    left.set_ylim(0.3, 1.02)
    left.grid(alpha=0.3)
    left.legend()
    left.set_title("two facts thousands of tokens apart")
    rows = results["step_seconds"]
    lengths = [r["length"] for r in rows]
    right.plot(
        lengths, [r["keras_relattn"] for r in rows], "o-", label="keras_relattn"
    )
    hub = [(r["length"], r["keras_hub"]) for r in rows if r["keras_hub"] is not None]
    right.plot(*zip(*hub), "s--", label="KerasHub DebertaV3")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(lengths, [str(n) for n in lengths])
    right.set_xlabel("tokens")
    right.set_ylabel(f"seconds per step (batch {results['batch_size']})")
    right.grid(alpha=0.3)
    right.legend()
    right.set_title(f"one training step ({results['backend']}, CPU)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "long_documents.png"), dpi=110)
    plt.close(fig)


def table(results):
    tuning = results["fine_tuning"]
    lines = [
        "| tokens read | test accuracy | seconds per step | KerasHub's |",
        "|---|---|---|---|",
    ]
    steps = {r["length"]: r for r in results["step_seconds"]}
    for length in sorted(set(steps) | {results["short"], results["long"]}):
        accuracy = tuning.get(str(length), {}).get("final_accuracy")
        row = steps.get(length, {})
        hub = row.get("keras_hub")
        lines.append(
            f"| {length} | {'-' if accuracy is None else f'{accuracy:.3f}'} | "
            f"{row.get('keras_relattn', '-')} | {'-' if hub is None else hub} |"
        )
    return "\n".join(lines)


def write_table(results, page):
    with open(page) as f:
        lines = f.read().split("\n")
    start = lines.index("<!-- long_documents -->") + 1
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1
    lines[start:end] = table(results).split("\n")
    with open(page, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-documents", type=int, default=96)
    p.add_argument("--test-documents", type=int, default=24)
    p.add_argument("--evaluations", type=int, default=3)
    p.add_argument(
        "--keras-hub-lengths", type=int, nargs="+", default=[512, 1024, 2048]
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "examples"))
    p.add_argument(
        "--quick", action="store_true", help="3 steps on 16 documents, no table"
    )
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results = run(args)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.out, "long_documents.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out)
    if not args.quick:
        write_table(
            results, os.path.join(ROOT, "docs", "examples", "long_documents.md")
        )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
