"""`python benchmarks/bench.py`: time RelativeAttention against baselines.

Systems, timed interleaved in one process (round-robin, one call each per
round) so that machine noise hits them alike:

- `ours`: this package's layer on the current Keras backend, compiled with the
  backend's own compiler (`jax.jit`, `tf.function(jit_compile=True)`; torch
  runs eagerly unless `--torch-compile`);
- `ours_c2c` (only when named in `--systems`): the same layer with the content
  term alone, no table: `ours - ours_c2c` is what the position terms cost;
- `keras_mha`: `keras.layers.MultiHeadAttention` returning its scores, on the
  same backend and compiler: the cost of plain attention;
- `edspdf`: edspdf's PyTorch `RelativeAttention`, eager, when installed. Ours
  is checked against it (same weights, 1e-4) before anything is timed;
- `deberta`: KerasHub's DeBERTa-v3 disentangled attention, when installed.

Workloads (self attention, D=128, 4 heads, a 64-entry table, an all-true key
mask, random relative positions within the table, all three modes):
W1 batch 8 x length 128; W2 batch 4 x length 512; W3 batch 8 x length 256 with
2-D positions. Prints medians and ratios, writes JSON, and with `--plot`
draws time against sequence length (log-log) to a PNG.

Pick the backend with `--backend` (the run re-executes itself with
`KERAS_BACKEND` set) or with `KERAS_BACKEND`.

This is the one command line; the measuring files, each also runnable on its
own with its own flags: bench_paths.py (the tables above), bench_long.py
(`--long`), bench_peers.py (`--model`, and the peers' systems); what they
share, _bench_common.py.
"""

import argparse
import importlib
import json
import os
import sys

from _relaunch import on_backend

FLAGS = {  # every flag, in the order of `--help`
    "--backend": dict(choices=["tensorflow", "jax", "torch"]),
    "--workloads": dict(default="W1,W2,W3", help="comma-separated, of W1,W2,W3"),
    "--backward": dict(action="store_true", help="time forward+backward"),
    "--pooled": dict(action="store_true",
                     help="the pooled output alone (ours: return_logits=False; MHA: no scores)"),
    "--repeats": dict(type=int, default=15, help="timed rounds per workload"),
    "--systems": dict(default="ours,keras_mha,edspdf,deberta"),
    "--torch-compile": dict(action="store_true", help="torch.compile ours"),
    "--model": dict(action="store_true",
                    help="train_on_batch of a 2-block model, against the same model with MHA"),
    "--model-length": dict(type=int, default=None,
                           help="with --model: batch 1 x this length, per-token 1-D positions"),
    "--long": dict(action="store_true",
                   help="peak memory and time of one pooled-only eager call at long lengths "
                        "(with --backward: one forward + backward)"),
    "--long-systems": dict(
        default="ours,ours_tokens,keras_mha",
        help="of ours (n x n offsets), ours_tokens (per-token positions), keras_mha, "
             "box_transformer (a 1-layer BoxTransformer over one page of n lines: "
             "its box offsets are formed per block), deberta_model (2 DeBERTa-v3 "
             "layers, hidden 64, on keras_relattn.deberta), keras_hub_deberta and "
             "transformers_deberta (the same layers in KerasHub and, on torch, "
             "Hugging Face)"),
    "--long-compiled": dict(
        action="store_true",
        help="with --long --backward: the step compiled by XLA (jax.jit, "
             "tf.function(jit_compile=True)), its first call measured (the compiler's "
             "own memory included)"),
    "--long-lengths": dict(default="1024,2048,4096,8192,16384"),
    "--long-mha-max": dict(type=int, default=8192,
                           help="longest length run for the systems that hold (n, n) tensors in "
                                "--long: Keras MHA, KerasHub's and Hugging Face's DeBERTa"),
    "--json": dict(default=None, help="write the results here"),
    "--plot": dict(default=None, help="PNG: time vs length, log-log"),
    "--plot-lengths": dict(default="64,128,256,512,1024"),
    "--plot-batch": dict(type=int, default=2),
}

# What each measuring file runs (imported once the backend is fixed: it imports
# keras), and the flags it reads besides --backend; those it lacks keep their defaults.
MEASURES = {
    "paths": ("bench_paths", "run", ("--workloads", "--backward", "--pooled", "--repeats",
                                     "--systems", "--torch-compile", "--json", "--plot",
                                     "--plot-lengths", "--plot-batch")),
    "long": ("bench_long", "run_long", ("--backward", "--long-systems", "--long-compiled",
                                        "--long-lengths", "--long-mha-max", "--json")),
    "model": ("bench_peers", "run_model", ("--repeats", "--torch-compile", "--model-length",
                                           "--json")),
}


def parser(names, prog="python benchmarks/bench.py", doc=__doc__):
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in names:
        p.add_argument(name, **FLAGS[name])
    return p


def parse(argv, measure=None, prog="python benchmarks/bench.py", doc=__doc__):
    """bench.py's flags (every one), or those of one `measure` (the others
    at their defaults)."""
    if measure is None:
        return parser(FLAGS, prog, doc).parse_args(argv)
    p = parser(("--backend", *MEASURES[measure][2]), prog, doc)
    p.set_defaults(**vars(parser(FLAGS).parse_args([])))
    return p.parse_args(argv)


def main(argv=None, measure=None, script=__file__, doc=__doc__):
    """Run `measure` (by default the one bench.py's flags pick) from `script`,
    which `--backend` re-executes."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv, measure, f"python benchmarks/{os.path.basename(script)}", doc)
    code = on_backend(args.backend, script, argv)
    if code is not None:
        return code
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if measure is None:
        measure = "model" if args.model else "long" if args.long else "paths"
    module, function, _ = MEASURES[measure]
    result = getattr(importlib.import_module(module), function)(args)
    if measure == "paths":  # it writes its JSON itself
        return result
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
