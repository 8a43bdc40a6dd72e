"""Print the README's performance tables from the benchmark runs in this folder.

    python benchmarks/readme_tables.py

tests/test_docs.py checks that the README holds exactly these tables, so the
numbers there are always the ones in the JSON files next to this script.
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {
    ("jax", "jax.jit"): "JAX, `jax.jit`",
    ("tensorflow", "XLA (tf.function jit_compile)"): "TensorFlow, XLA",
    ("torch", "eager"): "PyTorch, eager",
}
TABLES = {
    "cpu_forward": ["forward_jax.json", "forward_tensorflow.json", "forward_torch.json"],
    "cpu_backward": ["backward_jax.json", "backward_tensorflow.json"],
    "gpu": [
        "gpu_h100/gpu_forward_jax.json",
        "gpu_h100/gpu_backward_jax.json",
        "gpu_h100/gpu_forward_torch.json",
    ],
}


def table(files, with_mode=False):
    lines = [
        "| backend | workload | ours | edspdf | Keras MHA | ours / edspdf | ours / MHA |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in files:
        with open(os.path.join(HERE, name)) as f:
            run = json.load(f)
        label = NAMES[(run["backend"], run["compiler"])]
        if with_mode:
            label += ", " + {"forward": "forward", "forward+backward": "fwd+bwd"}[run["mode"]]
        for workload, entry in run["workloads"].items():
            ms = entry["median_ms"]
            lines.append(
                f"| {label} | {workload} | {ms['ours']:.2f} | {ms['edspdf']:.2f} | "
                f"{ms['keras_mha']:.2f} | **{ms['ours'] / ms['edspdf']:.2f}** | "
                f"**{ms['ours'] / ms['keras_mha']:.2f}** |"
            )
    return "\n".join(lines)


def tables():
    return {key: table(files, with_mode=key == "gpu") for key, files in TABLES.items()}


if __name__ == "__main__":
    for key, text in tables().items():
        print(f"<!-- {key} -->\n{text}\n")
