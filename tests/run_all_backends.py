"""Runs the whole test suite once per Keras backend, each in its own process.

Usage: python tests/run_all_backends.py [extra pytest arguments]
Exits non-zero if any backend fails.

Each run spreads its tests over the machine's cores (pytest-xdist, `-n auto`,
unless the arguments choose). The JAX run is compile-bound: eager JAX compiles
each operation once per shape (about 760 XLA compilations in one banded test),
so it compiles at XLA's lowest optimization level, with the CPU backend's
older elemental emitters (about 25 ms per small program instead of 46), and
its workers share one persistent compilation cache, new for each run (the
same small programs compile once, not once per worker). Together: the JAX run
586 s -> 389 s on a 2-core machine. The TensorFlow run gains nothing from the
same flags (its XLA programs are few), so it keeps XLA's defaults.
"""

import os
import subprocess
import shutil
import sys
import tempfile
import time

BACKENDS = ("tensorflow", "jax", "torch")
JAX_TEST_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                  " --xla_cpu_use_fusion_emitters=false")


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
        cache = None
        if backend == "jax":
            env.setdefault("XLA_FLAGS", JAX_TEST_FLAGS)
            cache = tempfile.mkdtemp(prefix="jax-cache-")
            env.update(JAX_COMPILATION_CACHE_DIR=cache,
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
        start = time.time()
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv],
            cwd=root,
            env=env,
        )
        print(f"===== {backend}: exit {code} in {time.time() - start:.0f} s", flush=True)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
        if code != 0:
            failed.append(backend)
    if failed:
        print(f"\nFAILED on: {', '.join(failed)}")
        return 1
    print("\nall backends passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
