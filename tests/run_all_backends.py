"""Runs the whole test suite once per Keras backend, each in its own process.

Usage: python tests/run_all_backends.py [extra pytest arguments]
Exits non-zero if any backend fails.

Each run spreads its tests over the machine's cores (pytest-xdist, `-n auto`,
unless the arguments choose). The JAX run compiles XLA code at its lowest
optimization level: the tests compile hundreds of small programs once each,
where compiling, not running, is the time (about 40% of the JAX run).
"""

import os
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")
JAX_TEST_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def torch_build():
    """Which torch build pip installed (the CPU one, or the default CUDA one
    with triton: tests/test_import_order.py), asked in a subprocess so that
    this runner imports no framework."""
    code = ("import importlib.util, torch; cuda = torch.version.cuda; "
            "print(f'torch build: {torch.__version__} ' + (f'(CUDA {cuda})' if cuda else '(CPU)') "
            "+ '; triton installed:', importlib.util.find_spec('triton') is not None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "torch build: torch not importable"


def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(torch_build(), flush=True)
    if not any(a.startswith("-n") or a == "no:xdist" for a in argv):
        argv = ["-n", "auto", *argv]
    failed = []
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        if backend == "jax":
            env.setdefault("XLA_FLAGS", JAX_TEST_FLAGS)
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
        start = time.time()
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv],
            cwd=root,
            env=env,
        )
        print(f"===== {backend}: exit {code} in {time.time() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(backend)
    if failed:
        print(f"\nFAILED on: {', '.join(failed)}")
        return 1
    print("\nall backends passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
