"""The floor of the banded path on torch's CPU flash kernel: what the far
keys cost on the fused kernel against the one call Keras MHA makes.

    python benchmarks/flash_floor.py [--length 4096] [--heads 4] [--head-size 32]

Forward and forward + backward, steady state (best of `--repeats` after a
warm-up), in one process, of:
- `full`: one non-causal call over every key, with a key mask (what Keras
  MHA runs on torch: the floor MHA sets);
- `two causal`: the banded path's far keys, two causal calls of `length -
  skip` queries (the left keys, and the right keys on the reversed
  sequence), what `_backend.torch_fused.attend_band` runs;
- `stacked causal`: the same two stacked on the batch axis, one call.
The ratio of each to `full`: how far above MHA's whole step the far keys
alone put the banded path, before its window of keys near each query.
"""

import argparse
import sys
import time


def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/flash_floor.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--skip", type=int, default=32, help="queries each causal part skips")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def best_ms(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv):
    args = parse(argv)
    import torch

    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    n, h, d = args.length, args.heads, args.head_size

    def case(batch, rows, causal):
        q, k, v = (torch.randn(batch, h, m, d) for m in (rows, n, n))
        mask = torch.zeros(batch, 1, 1, n)

        def fwd():
            return forward(q, k, v, 0.0, causal, attn_mask=mask, scale=1.0)

        def fwd_bwd():
            out, lse = fwd()
            backward(torch.ones_like(out), q, k, v, out, lse, 0.0, causal, attn_mask=mask,
                     scale=1.0)

        return best_ms(fwd, args.repeats), best_ms(fwd_bwd, args.repeats)

    rows = n - args.skip
    results = {"full": case(1, n, False)}
    one = case(1, rows, True)
    results["two causal"] = (2 * one[0], 2 * one[1])
    results["stacked causal"] = case(2, rows, True)
    print(f"torch {torch.__version__}, CPU flash kernel, {n} tokens, {h} heads x {d}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats}, ms")
    print(f"{'':16} {'forward':>9} {'fwd+bwd':>9} {'fwd+bwd / full':>15}")
    for name, (f, fb) in results.items():
        print(f"{name:16} {f:9.1f} {fb:9.1f} {fb / results['full'][1]:15.2f}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
