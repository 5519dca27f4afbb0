"""Where a compiled step's time goes, op by op: the XLA ops of a ``jax.profiler`` trace, summed by
op class (convolution, dot, reduction, transpose/copy, loop, elementwise) and by the model module
their HLO metadata names (encoder, decoder, RSSM, ...).

``hlo_ops`` reads the compiled program's text (``compiled.as_text()``): every instruction's name,
opcode, called computation and ``op_name`` metadata. ``trace_op_times`` sums the
durations of a perfetto trace's events by name. ``breakdown`` joins the two.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from typing import Any, Iterable, Mapping

# Flax module class in an op's metadata path -> the model part it belongs to; the first class named
# in the path (the outermost) decides, so the implicit-action network's inner ResNet counts as
# the implicit-action network.
MODULES = {
    "ImplicitActionEncoder": "implicit-action network",
    "PixelForwardModel": "code forward model",
    "CodeForwardModel": "code forward model",
    "ResNetEncoder": "encoder",
    "PlainEncoder": "encoder",
    "ResNetDecoder": "decoder",
    "PlainDecoder": "decoder",
    "RSSM": "RSSM",
    "Actor": "actor",
    "ScalarHead": "reward / critic heads",
    "MLP": "action encoder",
}
CONTAINERS = ("while", "call", "conditional")  # ops whose time is their called computations' ops

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_MODULE = re.compile(r"\b(" + "|".join(MODULES) + r")\b")


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Instruction name -> ``{opcode, calls, op_name, computation, inner}``, where ``inner``
    lists the opcodes of the computation a fusion or custom call calls."""
    ops: dict[str, dict[str, Any]] = {}
    opcodes_of: dict[str, list[str]] = collections.defaultdict(list)
    computation = ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            computation = head.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        calls, op_name, target = _CALLS.search(line), _OP_NAME.search(line), _TARGET.search(line)
        ops[name] = {
            "opcode": opcode,
            "target": target.group(1) if target else "",
            "calls": calls.group(1) if calls else "",
            "op_name": op_name.group(1) if op_name else "",
            "computation": computation,
        }
        opcodes_of[computation].append(opcode)
    for op in ops.values():
        op["inner"] = opcodes_of.get(op["calls"], [])
    return ops


def op_class(op: Mapping[str, Any], name: str = "") -> str:
    """The class of one instruction, looking into the computation a fusion calls."""
    opcodes = [op["opcode"], *op.get("inner", [])]
    if "convolution" in opcodes or re.match(r"conv(olution)?[._\d]", name) or "conv" in op.get("target", ""):
        return "convolution"  # the last: a convolution library's custom call (nets/onednn)
    if "dot" in opcodes:
        return "dot"
    if "reduce" in opcodes or "reduce-window" in opcodes:
        return "reduction"
    if name.startswith(("transpose", "copy")) or "transpose_copy" in name:
        return "transpose/copy"
    if set(opcodes) <= {"transpose", "copy", "bitcast", "parameter", "tuple", "get-tuple-element", "reshape"}:
        return "transpose/copy"
    if op["opcode"] in (
        "fusion",
        "add",
        "multiply",
        "subtract",
        "divide",
        "maximum",
        "select",
        "exponential",
        "tanh",
        "log",
        "negate",
        "compare",
        "convert",
        "broadcast",
    ):
        return "elementwise"
    return "other"


def module_of(op_name: str) -> str:
    """The model part an op's metadata path names (``other``: optimiser, losses, glue; XLA's
    rewrites, such as weight-gradient convolutions and layout copies, often carry no metadata)."""
    if not op_name:
        return "unattributed (no metadata)"
    found = [(match.start(), MODULES[match.group(1)]) for match in _MODULE.finditer(op_name)]
    return min(found)[1] if found else "other"


def trace_op_times(events: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Microseconds per event name over the complete ("X") events of a trace."""
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += float(event.get("dur", 0.0))
    return dict(totals)


def read_trace(path: str) -> list[dict[str, Any]]:
    """The events of a (gzipped) perfetto / chrome trace JSON file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    return data["traceEvents"] if isinstance(data, dict) else data


def breakdown(ops: Mapping[str, Mapping[str, Any]], times: Mapping[str, float], top_ops: int = 15) -> dict[str, Any]:
    """Seconds by op class and by module of the trace events that are instructions of ``ops``
    (events of other names, such as host-side Python or runtime waits, are left out), and the
    ``top_ops`` longest instructions."""
    by_class: dict[str, float] = collections.defaultdict(float)
    by_module: dict[str, float] = collections.defaultdict(float)
    rows = []
    for name, micros in times.items():
        op = ops.get(name)
        if op is None or op["opcode"] in CONTAINERS:  # their events enclose their body's own events
            continue
        seconds = micros / 1e6
        kind, module = op_class(op, name), module_of(op["op_name"])
        by_class[kind] += seconds
        by_module[module] += seconds
        rows.append({"name": name, "class": kind, "module": module, "seconds": seconds, "op_name": op["op_name"]})
    total = sum(by_class.values())
    top = sorted(rows, key=lambda row: -row["seconds"])[:top_ops]
    return {"total_seconds": total, "by_class": dict(by_class), "by_module": dict(by_module), "top_ops": top}


def format_breakdown(result: Mapping[str, Any], calls: int) -> str:
    """Two markdown tables (op class, module): seconds per call and share."""
    total = result["total_seconds"] or 1e-12
    lines = [
        f"XLA op time per call: {result['total_seconds'] / calls * 1e3:.1f} ms ({calls} calls traced)",
        "",
        "| op class | ms per call | share |",
        "|---|---|---|",
    ]
    for name, seconds in sorted(result["by_class"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {seconds / calls * 1e3:.1f} | {seconds / total:.1%} |")
    lines += ["", "| module | ms per call | share |", "|---|---|---|"]
    for name, seconds in sorted(result["by_module"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {seconds / calls * 1e3:.1f} | {seconds / total:.1%} |")
    lines += ["", "| longest ops | class | module | ms per call | metadata |", "|---|---|---|---|---|"]
    for row in result.get("top_ops", []):
        where = row["op_name"][-70:]
        lines.append(
            f"| {row['name']} | {row['class']} | {row['module']} | {row['seconds'] / calls * 1e3:.1f} | {where} |"
        )
    return "\n".join(lines)
