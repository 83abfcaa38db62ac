"""Where the time of one jitted train (or predict) step goes, op by op (bare JAX install).

    python benchmarks/profile_step.py --backbone=resnet101 --size=227 --batch=4

Traces a few steps with ``jax.profiler`` and sums the duration of each compiled HLO op
(on GPU the device kernels, on CPU the host thunks; CPU thunks can overlap, so their sum may
exceed the wall time). Prints the top ops with the model layer they come from, then totals
per kind: ``conv`` forward, ``conv_grad`` (input and weight gradients), ``matmul`` (1x1 convs
as matrix products, forward and gradients), ``transpose`` (layout copies), ``pool``,
``elementwise`` (BatchNorm, ReLU, loss, optimizer) and ``other``.
"""

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax
import train_step  # benchmarks/train_step.py: the case builder; puts the repo on sys.path

from hairseg_jax import cli


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the ``op_name`` of the JAX operation it came from.

    For a fusion, the convolution or dot product inside it names it, else its own metadata;
    an unnamed convolution (XLA:CPU's weight-gradient fusions carry no metadata) is named
    ``transpose(weight gradient)/conv_general_dilated``.
    """
    own, inner, calls = {}, collections.defaultdict(list), {}
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and " = " not in line:
            computation = header.group(1)
            continue
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not match:
            continue
        op_name = re.search(r'op_name="([^"]+)"', line)
        if " convolution(" in line and not op_name:  # e.g. a weight gradient, unnamed
            inner[computation].append("transpose(weight gradient)/conv_general_dilated")
        if op_name:
            own[match.group(1)] = op_name.group(1)
            inner[computation].append(op_name.group(1))
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[match.group(1)] = called.group(1)
    names = dict(own)
    for op, computation in calls.items():
        for primitive in ("conv_general_dilated", "dot_general"):
            found = [name for name in inner[computation] if name.endswith(primitive)]
            if found:
                names[op] = found[0]
                break
    return names


def op_kind(hlo_op: str, op_name: str) -> str:
    """A coarse kind of an op from its HLO name and JAX op_name."""
    if op_name.endswith("conv_general_dilated"):
        return "conv_grad" if "transpose(" in op_name else "conv"
    if op_name.endswith("dot_general"):
        return "matmul"
    if "transpose" in hlo_op or hlo_op.startswith("copy"):
        return "transpose"
    if "reduce-window" in hlo_op or "select-and-scatter" in hlo_op or "max_pool" in op_name:
        return "pool"
    if "fusion" in hlo_op or "iota" in hlo_op or "broadcast" in hlo_op:
        return "elementwise"
    return "other"


def profile(case: train_step.JaxCase, steps: int) -> dict[str, float]:
    """Microseconds per step of every HLO op of ``case``'s compiled step."""
    state, out = case.run(case.state)
    jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                state, out = case.run(state)
            jax.block_until_ready(out)
        trace_file = next(Path(trace_dir).rglob("perfetto_trace.json.gz"))
        with gzip.open(trace_file) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e["name"] == "process_name"
    }
    on_device = any("/device:" in name for name in processes.values())
    durations: collections.Counter[str] = collections.Counter()
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        module = e.get("args", {}).get("hlo_module", "")
        if e.get("ph") != "X" or not op or module not in ("jit_train_step", "jit_predict_step"):
            continue
        if on_device and "/device:" not in processes.get(e["pid"], ""):
            continue
        durations[op] += e.get("dur", 0.0) / steps
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train_step.add_case_flags(parser, size=227, batch=4)
    parser.add_argument("--predict", action="store_true", help="profile inference instead")
    parser.add_argument("--steps", type=train_step.positive_int, default=2, help="traced steps")
    parser.add_argument(
        "--top", type=train_step.positive_int, default=15, help="ops listed one by one"
    )
    args = parser.parse_args()
    config = train_step.case_from_flags(args)
    case = train_step.compile_jax(config, args.predict)
    step_s, state = train_step.time_jax(case, args.steps, 1)
    case = case._replace(state=state)
    names = hlo_op_names(case.compiled.as_text())
    durations = profile(case, args.steps)
    total = sum(durations.values())
    device = jax.devices()[0].device_kind
    print(
        f"# profile {'predict' if args.predict else 'train'} step backbone={args.backbone} "
        f"size={args.size} batch={args.batch} dtype={args.dtype} device={device} "
        f"step_ms={1e3 * step_s:.1f} op_ms_sum={total / 1e3:.1f}"
    )
    kinds: collections.Counter[str] = collections.Counter()
    for op, us in durations.items():
        kinds[op_kind(op, names.get(op, ""))] += us
    for op, us in durations.most_common(args.top):
        layer = (
            names.get(op, "").removeprefix("jit(train_step)/").removeprefix("jit(predict_step)/")
        )
        kind = op_kind(op, names.get(op, ""))
        print(f"op {us / 1e3:8.2f} ms {100 * us / total:5.1f}% {kind:11s} {op} {layer}")
    for kind, us in kinds.most_common():
        print(f"kind {kind:11s} {us / 1e3:8.2f} ms {100 * us / total:5.1f}%")


if __name__ == "__main__":
    cli.run_interruptibly(main, "while benchmarking")
