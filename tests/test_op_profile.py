"""The op profile's parsing of compiled HLO text and of a trace, on small hand-written inputs, and
on a real compiled convolution (the names in the trace match the program's instructions)."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from prelar_jax.perf import op_profile

HLO = """HloModule jit_step

%fused_computation.1 (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %multiply.2 = f32[4]{0} multiply(f32[4]{0} %p0, f32[4]{0} %p0)
}

%body (t: (f32[4])) -> (f32[4]) {
  %t = (f32[4]{0}) parameter(0)
  %dot.7 = f32[4]{0} dot(f32[4]{0} %x, f32[4,4]{1,0} %w), metadata={op_name="jit(f)/while/body/RSSM/GRU/dot_general"}
}

ENTRY %main (a: f32[8,8,8,3], k: f32[3,3,3,3]) -> f32[4] {
  %conv.3 = f32[8,8,8,3]{3,2,1,0} convolution(f32[8,8,8,3]{3,2,1,0} %a, f32[3,3,3,3]{3,2,1,0} %k), window={size=3x3}, metadata={op_name="jit(f)/jvp(ImplicitActionEncoder)/ResNetEncoder_0/Conv_0/conv_general_dilated"}
  %fusion.4 = f32[4]{0} fusion(f32[4]{0} %y), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(f)/jvp(ResNetDecoder)/mul"}
  %transpose_copy_fusion.5 = f32[4]{0} fusion(f32[4]{0} %y), kind=kLoop, calls=%fused_computation.1
  %convert_select_fusion.10 = f32[4]{0} fusion(f32[4]{0} %y), kind=kLoop, calls=%fused_computation.1
  %while.6 = (f32[4]) while((f32[4]) %t0), body=%body, metadata={op_name="jit(f)/while"}
  %ffi_call.9 = f32[8,8,8,3]{3,2,1,0} custom-call(%a, %k), custom_call_target="prelar_onednn_conv_backward_data", metadata={op_name="jit(f)/transpose(jvp(ResNetEncoder))/ffi_call"}
  ROOT %reduce.8 = f32[] reduce(f32[4]{0} %z, f32[] %c), metadata={op_name="jit(f)/adam/reduce_sum"}
}
"""


def test_hlo_ops_reads_names_opcodes_fusions_and_metadata():
    ops = op_profile.hlo_ops(HLO)
    assert ops["conv.3"]["opcode"] == "convolution"
    assert ops["fusion.4"]["calls"] == "fused_computation.1" and ops["fusion.4"]["inner"] == ["parameter", "multiply"]
    assert ops["dot.7"]["computation"] == "body"
    assert op_profile.op_class(ops["conv.3"], "conv.3") == "convolution"
    assert op_profile.op_class(ops["fusion.4"], "fusion.4") == "elementwise"
    # A fusion named for a convert is no convolution (bfloat16 steps have many).
    assert op_profile.op_class(ops["convert_select_fusion.10"], "convert_select_fusion.10") == "elementwise"
    assert op_profile.op_class(ops["transpose_copy_fusion.5"], "transpose_copy_fusion.5") == "transpose/copy"
    assert op_profile.op_class(ops["dot.7"], "dot.7") == "dot"
    assert op_profile.op_class(ops["reduce.8"], "reduce.8") == "reduction"
    # A convolution library's custom call (nets/onednn) is a convolution, in its module.
    assert ops["ffi_call.9"]["target"] == "prelar_onednn_conv_backward_data"
    assert op_profile.op_class(ops["ffi_call.9"], "ffi_call.9") == "convolution"


def test_module_is_the_outermost_named_flax_module():
    assert op_profile.module_of("jit(f)/jvp(ImplicitActionEncoder)/ResNetEncoder_0/Conv_0/x") == (
        "implicit-action network"
    )
    assert op_profile.module_of("jit(f)/transpose(jvp(ResNetEncoder))/Conv_0/x") == "encoder"
    assert op_profile.module_of("jit(f)/adam/mul") == "other"
    assert op_profile.module_of("") == "unattributed (no metadata)"


def test_breakdown_sums_leaf_ops_and_skips_containers_and_host_events(tmp_path):
    events = [
        {"ph": "X", "name": "conv.3", "dur": 3000.0},
        {"ph": "X", "name": "conv.3", "dur": 1000.0},
        {"ph": "X", "name": "fusion.4", "dur": 2000.0},
        {"ph": "X", "name": "while.6", "dur": 9000.0},  # encloses dot.7: not counted twice
        {"ph": "X", "name": "dot.7", "dur": 500.0},
        {"ph": "X", "name": "PjitFunction(step)", "dur": 99000.0},  # host side: not an instruction
        {"ph": "i", "name": "conv.3", "dur": 5000.0},  # not a complete event
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    result = op_profile.breakdown(op_profile.hlo_ops(HLO), op_profile.trace_op_times(op_profile.read_trace(str(path))))
    assert result["total_seconds"] == pytest.approx(0.0065)
    assert result["by_class"] == pytest.approx({"convolution": 0.004, "elementwise": 0.002, "dot": 0.0005})
    assert result["by_module"] == pytest.approx({"implicit-action network": 0.004, "decoder": 0.002, "RSSM": 0.0005})
    assert result["top_ops"][0]["name"] == "conv.3"
    table = op_profile.format_breakdown(result, calls=2)
    assert "| convolution | 2.0 | 61.5% |" in table


def test_compiled_instruction_names_are_found():
    f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME"))
    text = f.lower(jnp.ones((1, 3, 8, 8)), jnp.ones((4, 3, 3, 3))).compile().as_text()
    ops = op_profile.hlo_ops(text)
    assert any(op_profile.op_class(op, name) == "convolution" for name, op in ops.items())
