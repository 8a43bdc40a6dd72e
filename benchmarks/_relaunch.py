"""Running a benchmark script on the backend its `--backend` names.

Keras reads `KERAS_BACKEND` once, at import, so a script asked for another
backend than its environment's runs itself again in a child process.
"""

import os
import subprocess
import sys


def on_backend(backend, script, argv):
    """The exit code of `script argv` re-run with `KERAS_BACKEND=backend`, or
    None when this process already has that backend (or none was asked
    for): then the caller goes on."""
    if not backend or os.environ.get("KERAS_BACKEND") == backend:
        return None
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.call([sys.executable, os.path.abspath(script), *argv], env=env)
