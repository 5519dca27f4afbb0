"""The throughput suite's derived figures (prelar_jax/perf/throughput_report.py): the whole-protocol
estimate and the reference column.

Hand-computed cases against these pure functions (the measurements
themselves are exercised end to end in tests/test_throughput.py).
"""

import jax.numpy as jnp
import ml_collections
import pytest

from prelar_jax.perf import throughput_report as throughput


def _config(steps=1000, prefill=100, eval_every=300):
    c = ml_collections.ConfigDict()
    c.steps, c.prefill, c.pretrain, c.train_every, c.train_steps = steps, prefill, 5, 10, 2
    c.eval_every, c.eval_eps = eval_every, 2
    c.env = ml_collections.ConfigDict({"time_limit": 50})
    return c


def _row(name, devices, seconds, flops=None):
    return {
        "name": name,
        "devices": devices,
        "step_seconds_median": seconds,
        "compile_seconds": 1.0,
        "flops_per_step": flops,
        "flops_per_second": flops / seconds if flops else None,
        "compiled_peak_bytes": 2**20,
        "runtime_peak_bytes": None,
        "host_max_rss_bytes": 2**21,
    }


ROWS = [
    _row("update", 1, 0.5),
    _row("policy", 1, 0.01),
    _row("update", 2, 99.0),
    _row("policy", 2, 99.0),
]  # multi-device rows must not be used


def test_protocol_estimate_by_hand():
    env = [{"workers": 1, "fps": 100.0}, {"workers": 3, "fps": 250.0}]
    one, three = throughput.protocol_estimate(_config(), ROWS, env)
    # 900 learning steps: 5 + 90 * 2 updates; evaluations at 100, 400, 700 and the last step 1000
    # (900 % 300 == 0: the one at 1000 is the in-loop one), 2 episodes x 50 frames each.
    assert one["updates"] == 185 and one["eval_frames"] == 400 and one["train_frames"] == 1000
    assert one["policy_calls"] == 900 + 400
    assert one["seconds"] == pytest.approx({"updates": 92.5, "train_frames": 10.0, "eval_frames": 4.0, "policy": 13.0})
    assert one["total_seconds"] == pytest.approx(119.5)
    assert three["policy_calls"] == 300 + 134  # ceil(400 / 3)
    assert three["total_seconds"] == pytest.approx(92.5 + 4.0 + 1.6 + 4.34)


def test_protocol_estimate_counts_the_final_evaluation():
    # 950 learning steps, eval every 300: in-loop at 100, 400, 700, 1000, then the last step 1050.
    (est,) = throughput.protocol_estimate(_config(steps=1050), ROWS, [{"workers": 1, "fps": 100.0}])
    assert est["eval_frames"] == 5 * 2 * 50
    assert est["updates"] == 5 + 95 * 2


def test_protocol_estimate_needs_update_and_policy_rows():
    assert throughput.protocol_estimate(_config(), [_row("pretrain_step", 1, 1.0)], [{"workers": 1, "fps": 1.0}]) == []


def test_reference_column():
    rows = [_row("update", 1, 0.5, flops=4e9), _row("policy", 1, 0.01)]
    plain = throughput.format_table(rows).splitlines()
    with_ref = throughput.format_table(rows, reference_flops_per_second=16e9).splitlines()
    assert "% of ref" not in plain[0] and "% of ref" in with_ref[0]
    assert with_ref[2].split()[6] == "50.0"  # 4 GFLOP in 0.5 s = 8 GFLOP/s = 50% of 16
    assert with_ref[3].split()[6] == "-"  # no FLOP count, no share
    assert len(with_ref[1]) == len(with_ref[0])


def test_matmul_rate_counts_two_n_cubed():
    import jax

    result = throughput.matmul_rate(64, jnp.bfloat16, jax.devices()[0], warmup=0, steps=2)
    assert result["dtype"] == "bfloat16" and result["side"] == 64
    assert result["flops_per_second"] == pytest.approx(2 * 64**3 / result["seconds"])


def test_estimate_table_in_minutes_and_hours():
    (est,) = throughput.protocol_estimate(_config(), ROWS, [{"workers": 1, "fps": 100.0}])
    header, line = throughput.format_estimates([est]).splitlines()
    values = dict(zip(["workers", "fps", "updates", "frames", "policy", "total_min", "total_h"], line.split()))
    assert values["updates"] == f"{92.5 / 60:.1f}" and values["frames"] == f"{14.0 / 60:.1f}"
    assert values["total_min"] == f"{119.5 / 60:.1f}" and values["total_h"] == f"{119.5 / 3600:.2f}"


def test_conv_rates_record(tmp_path):
    import json

    from prelar_jax.runtime.config import config_module

    conv_rates = config_module("experiments/conv_rates.py")  # a script: loaded from its file
    out = tmp_path / "conv.json"
    conv_rates.main(["--batch", "2", "--matmul", "64", "--repeats", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["matmul"]["side"] == 64 and record["matmul"]["gflops"] > 0
    assert [r["shape"] for r in record["convolutions"]] == [
        f"2x{side}x{side}x{cin}->{cout}" for side, cin, cout in conv_rates.PAPER_SHAPES
    ]
    for row, (side, cin, cout) in zip(record["convolutions"], conv_rates.PAPER_SHAPES):
        assert row["gflop"] == pytest.approx(2 * 2 * side * side * 9 * cin * cout / 1e9)
        for part in ("fwd", "dgrad", "wgrad"):
            assert row[f"{part}_gflops"] == pytest.approx(row["gflop"] / (row[f"{part}_ms"] / 1e3))
