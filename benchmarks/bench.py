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
"""

import argparse
import os
import sys

from _relaunch import on_backend


def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["tensorflow", "jax", "torch"])
    p.add_argument("--workloads", default="W1,W2,W3", help="comma-separated, of W1,W2,W3")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--pooled", action="store_true",
                   help="the pooled output alone (ours: return_logits=False; MHA: no scores)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per workload")
    p.add_argument("--systems", default="ours,keras_mha,edspdf,deberta")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile ours")
    p.add_argument("--model", action="store_true",
                   help="train_on_batch of a 2-block model, against the same model with MHA")
    p.add_argument("--model-length", type=int, default=None,
                   help="with --model: batch 1 x this length, per-token 1-D positions")
    p.add_argument("--long", action="store_true",
                   help="peak memory and time of one pooled-only eager call at long lengths "
                        "(with --backward: one forward + backward)")
    p.add_argument("--long-systems", default="ours,ours_tokens,keras_mha",
                   help="of ours (n x n offsets), ours_tokens (per-token positions), keras_mha, "
                        "box_transformer (a 1-layer BoxTransformer over one page of n lines: "
                        "its box offsets are formed per block), deberta_model (2 DeBERTa-v3 "
                        "layers, hidden 64, on keras_relattn.deberta), keras_hub_deberta and "
                        "transformers_deberta (the same layers in KerasHub and, on torch, "
                        "Hugging Face)")
    p.add_argument("--long-compiled", action="store_true",
                   help="with --long --backward: the step compiled by XLA (jax.jit, "
                        "tf.function(jit_compile=True)), its first call measured (the compiler's "
                        "own memory included)")
    p.add_argument("--long-lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--long-mha-max", type=int, default=8192,
                   help="longest length run for the systems that hold (n, n) tensors in --long: "
                        "Keras MHA, KerasHub's and Hugging Face's DeBERTa")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="PNG: time vs length, log-log")
    p.add_argument("--plot-lengths", default="64,128,256,512,1024")
    p.add_argument("--plot-batch", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    code = on_backend(args.backend, __file__, argv)
    if code is not None:
        return code
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _bench_impl  # after the backend is fixed: it imports keras

    if args.model or args.long:
        import json

        result = (_bench_impl.run_model if args.model else _bench_impl.run_long)(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    return _bench_impl.run(args)


if __name__ == "__main__":
    sys.exit(main())
