"""Print the performance tables of README.md and docs/performance.md from the
benchmark runs in this folder.

    python benchmarks/readme_tables.py            # print them
    python benchmarks/readme_tables.py --write    # put them in the documents

tests/test_docs.py checks that each document holds exactly these tables, so
the numbers there are always the ones in the JSON files next to this script.
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {
    ("jax", "jax.jit"): "JAX, `jax.jit`",
    ("tensorflow", "XLA (tf.function jit_compile)"): "TensorFlow, XLA",
    ("tensorflow", "XLA"): "TensorFlow, XLA",
    ("torch", "eager"): "PyTorch, eager",
    ("torch", "torch.compile"): "PyTorch, `torch.compile`",
}
BACKENDS = ["jax", "tensorflow", "torch", "torch_compile"]
EAGER = {"jax": "JAX, eager", "tensorflow": "TensorFlow, eager", "torch": "PyTorch, eager"}
# Which document holds which table.
DOCUMENTS = {
    "headline": "README.md",
    "cpu_pooled": "docs/performance.md",
    "cpu_long": "docs/performance.md",
    "cpu_long_training": "docs/performance.md",
    "cpu_long_training_compiled": "docs/performance.md",
    "cpu_long_box": "docs/performance.md",
    "deberta_memory": "docs/performance.md",
    "deberta_peers": "docs/performance.md",
    "cpu_forward": "docs/performance.md",
    "cpu_backward": "docs/performance.md",
    "gpu": "docs/performance.md",
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


def load(name):
    with open(os.path.join(HERE, name)) as f:
        return json.load(f)


def table(files, with_mode=False):
    lines = [
        "| backend | workload | ours | edspdf | Keras MHA | ours / edspdf | ours / MHA |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in files:
        run = load(name)
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


def pooled_table():
    """The paths users run: pooled output only (`return_logits=False`, MHA
    returning its output only), forward + backward, a model's training step."""
    lines = [
        "| backend | path, workload | ours, ms | Keras MHA, ms | ours / MHA | ours / edspdf "
        "| page faults, ours / MHA |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend in BACKENDS:
        for kind, path in (("pooled_forward", "pooled fwd"),
                           ("pooled_backward", "pooled fwd+bwd")):
            run = load(f"{kind}_{backend}.json")
            label = NAMES[(run["backend"], run["compiler"])]
            for workload, entry in run["workloads"].items():
                ms = entry["median_ms"]
                lines.append(
                    f"| {label} | {path}, {workload} | {ms['ours']:.2f} | "
                    f"{ms['keras_mha']:.2f} | **{ms['ours'] / ms['keras_mha']:.2f}** | "
                    f"{ms['ours'] / ms['edspdf']:.2f} | {faults(entry)} |"
                )
        run = load(f"model_{backend}.json")
        ms = run["median_ms"]
        lines.append(
            f"| {NAMES[(run['backend'], run['compiler'])]} | 2-block model step, 8 x 256 2-D "
            f"| {ms['ours']:.2f} | {ms['keras_mha']:.2f} | "
            f"**{ms['ours'] / ms['keras_mha']:.2f}** | - | {faults(run)} |"
        )
    return "\n".join(lines)


def headline_table():
    """The README's summary: ours / MHA on the paths users run, and the
    memory of one training step at 8192 tokens."""
    lines = [
        "| backend | pooled forward, W2 | forward + backward, W3 | 2-block model step "
        "| training step at 8192 tokens: peak MiB, ours / MHA |",
        "|---|---|---|---|---|",
    ]

    def ratio(ms):
        return f"{ms['ours']:.1f} / {ms['keras_mha']:.1f} ms (**{ms['ours'] / ms['keras_mha']:.2f}x**)"

    for backend in BACKENDS:
        forward = load(f"pooled_forward_{backend}.json")
        backward = load(f"pooled_backward_{backend}.json")
        model = load(f"model_{backend}.json")
        memory = "-"
        if backend in EAGER:
            points = load(f"long_backward_{backend}.json")["points"]
            ours, mha = points["ours_tokens"].get("8192"), points["keras_mha"].get("8192")
            memory = f"{mib(ours['peak_bytes'])} / {mib(mha['peak_bytes'])} (eager)"
        lines.append(
            f"| {NAMES[(forward['backend'], forward['compiler'])]} "
            f"| {ratio(forward['workloads']['W2']['median_ms'])} "
            f"| {ratio(backward['workloads']['W3']['median_ms'])} "
            f"| {ratio(model['median_ms'])} | {memory} |"
        )
    return "\n".join(lines)


def faults(entry):
    """Minor page faults per timed call, ours / MHA: thousands of them mean a
    call gets its temporaries from the system afresh (docs/performance.md,
    "Page faults"), which its time includes."""
    counts = entry["faults_per_call"]
    return f"{counts['ours']:.0f} / {counts['keras_mha']:.0f}"


def long_table():
    lines = [
        "| backend | length | ours ms | Keras MHA ms | ours peak MiB | Keras MHA peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for backend in ("jax", "tensorflow", "torch"):
        run = load(f"long_{backend}.json")
        ours, mha = run["points"]["ours"], run["points"].get("keras_mha", {})
        for length in sorted(ours, key=int):
            theirs = mha.get(length)
            lines.append(
                f"| {EAGER[backend]} | {length} | {ours[length]['ms']:.0f} | "
                f"{'-' if theirs is None else format(theirs['ms'], '.0f')} | "
                f"{mib(ours[length]['peak_bytes'])} | "
                f"{'not run' if theirs is None else mib(theirs['peak_bytes'])} |"
            )
    return "\n".join(lines)


def long_training_table():
    """One eager forward + backward of the pooled output (table trainable),
    each point in a fresh process, inputs (positions too) counted."""
    lines = [
        "| backend | length | ours, per-token positions: ms / peak MiB "
        "| ours, (n, n) offsets: ms / peak MiB | Keras MHA: ms / peak MiB "
        "| per-token / MHA: time, memory |",
        "|---|---|---|---|---|---|",
    ]

    def cell(point):
        return "not run" if point is None else f"{point['ms']:.0f} / {mib(point['peak_bytes'])}"

    for backend in ("jax", "tensorflow", "torch"):
        points = load(f"long_backward_{backend}.json")["points"]
        tokens, offsets = points.get("ours_tokens", {}), points.get("ours", {})
        mha = points.get("keras_mha", {})
        for length in sorted(set(tokens) | set(offsets) | set(mha), key=int):
            ours, theirs = tokens.get(length), mha.get(length)
            ratio = "-"
            if ours and theirs:
                ratio = (f"{ours['ms'] / theirs['ms']:.2f}x, "
                         f"{ours['peak_bytes'] / max(theirs['peak_bytes'], 1):.2f}x")
            lines.append(
                f"| {EAGER[backend]} | {length} | {cell(ours)} | {cell(offsets.get(length))} "
                f"| {cell(theirs)} | {ratio} |"
            )
    return "\n".join(lines)


def long_compiled_table():
    """The same step compiled by XLA, its first call (compilation included)."""
    lines = [
        "| backend | length | ours, per-token positions: ms / peak MiB "
        "| Keras MHA: ms / peak MiB | ours / MHA: time, memory |",
        "|---|---|---|---|---|",
    ]
    for backend, label in (("jax", "JAX, `jax.jit`"), ("tensorflow", "TensorFlow, XLA")):
        points = load(f"long_backward_compiled_{backend}.json")["points"]
        tokens, mha = points.get("ours_tokens", {}), points.get("keras_mha", {})
        for length in sorted(set(tokens) | set(mha), key=int):
            ours, theirs = tokens.get(length), mha.get(length)
            ratio = "-"
            if ours and theirs:
                ratio = (f"{ours['ms'] / theirs['ms']:.2f}x, "
                         f"{ours['peak_bytes'] / max(theirs['peak_bytes'], 1):.2f}x")
            cells = ["not run" if p is None else f"{p['ms']:.0f} / {mib(p['peak_bytes'])}"
                     for p in (ours, theirs)]
            lines.append(f"| {label} | {length} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def long_box_table():
    """A one-layer `BoxTransformer` over one page: fwd + bwd, eager."""
    lines = ["| backend | lines | ms | peak MiB |", "|---|---|---|---|"]
    for backend in ("jax", "tensorflow", "torch"):
        points = load(f"long_backward_box_{backend}.json")["points"]["box_transformer"]
        for length in sorted(points, key=int):
            point = points[length]
            lines.append(f"| {EAGER[backend]} | {length} | {point['ms']:.0f} | "
                         f"{mib(point['peak_bytes'])} |")
    return "\n".join(lines)


DEBERTA_PEERS = ("keras_hub_deberta", "transformers_deberta")


def deberta_runs():
    """`(backend, what, points)` of the DeBERTa-v3 runs: fwd+bwd, then
    forward, per backend (`bench.py --long [--backward] --long-systems
    deberta_model,keras_hub_deberta[,transformers_deberta]`)."""
    for backend in ("torch", "jax", "tensorflow"):
        for what, name in (("fwd+bwd", "deberta_long_backward"), ("forward", "deberta_long")):
            yield backend, what, load(f"{name}_{backend}.json")["points"]


def deberta_memory_table():
    """The 2 DeBERTa-v3 layers' training step: peak memory at each length
    past 512."""
    lines = ["| backend | tokens | ms | peak MiB |", "|---|---|---|---|"]
    for backend, what, points in deberta_runs():
        if what != "fwd+bwd":
            continue
        for length, point in sorted(points["deberta_model"].items(), key=lambda i: int(i[0])):
            if int(length) > 512:
                lines.append(f"| {EAGER[backend]} | {length} | {point['ms']:.0f} | "
                             f"{mib(point['peak_bytes'])} |")
    return "\n".join(lines)


def deberta_peers_table():
    """Ours, KerasHub's and (torch) Hugging Face's DeBERTa-v3 layers: ms / peak
    MiB, and ours / theirs."""
    lines = [
        "| backend | tokens | ours | KerasHub | Hugging Face | ours / KerasHub: time, memory "
        "| ours / Hugging Face: time, memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, what, points in deberta_runs():
        ours = points["deberta_model"]
        for length in sorted(ours, key=int):
            if not any(length in points.get(peer, {}) for peer in DEBERTA_PEERS):
                continue  # past the peers' (n, n) tensors: in the memory table
            cells, ratios = [], []
            for peer in DEBERTA_PEERS:
                theirs = points.get(peer, {}).get(length)
                if theirs is None:
                    cells.append("-")
                    ratios.append("-")
                    continue
                cells.append(f"{theirs['ms']:.0f} / {mib(theirs['peak_bytes'])}")
                ratios.append(f"{ours[length]['ms'] / theirs['ms']:.2f}x, "
                              f"{ours[length]['peak_bytes'] / max(theirs['peak_bytes'], 1):.2f}x")
            mine = f"{ours[length]['ms']:.0f} / {mib(ours[length]['peak_bytes'])}"
            label = EAGER[backend].replace("eager", what)
            lines.append(f"| {label} | {length} | {mine} | {' | '.join(cells)} | "
                         f"{' | '.join(ratios)} |")
    return "\n".join(lines)


def mib(peak_bytes):
    return "< 1" if peak_bytes < 2**20 else f"{peak_bytes / 2**20:.0f}"


def tables():
    found = {key: table(files, with_mode=key == "gpu") for key, files in TABLES.items()}
    found["headline"] = headline_table()
    found["cpu_pooled"] = pooled_table()
    found["cpu_long"] = long_table()
    found["cpu_long_training"] = long_training_table()
    found["cpu_long_training_compiled"] = long_compiled_table()
    found["cpu_long_box"] = long_box_table()
    found["deberta_memory"] = deberta_memory_table()
    found["deberta_peers"] = deberta_peers_table()
    return found


def write():
    """Each table goes after its `<!-- key -->` line, replacing the lines up
    to the next blank one."""
    root = os.path.dirname(HERE)
    for key, text in tables().items():
        path = os.path.join(root, DOCUMENTS[key])
        with open(path) as f:
            lines = f.read().split("\n")
        start = lines.index(f"<!-- {key} -->") + 1
        end = start
        while end < len(lines) and lines[end].strip():
            end += 1
        lines[start:end] = text.split("\n")
        with open(path, "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        write()
    else:
        for key, text in tables().items():
            print(f"<!-- {key} ({DOCUMENTS[key]}) -->\n{text}\n")
