"""The default XLA flags: only for checked jaxlib versions, never overriding the user's."""

import os
import subprocess
import sys

from prelar_jax.runtime import xla_setup


def test_flags_only_for_checked_jaxlib_versions():
    assert xla_setup.default_flags("0.10.2") == ["--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
    assert xla_setup.default_flags("0.11.0") == []  # unknown flags abort XLA: never guess


def test_applied_in_this_session_and_accepted_by_xla():
    # The package is imported by conftest-collected tests before any backend starts.
    import jax

    if jax.lib.__version__.startswith("0.10."):
        assert "xla_cpu_experimental_ynn_fusion_type" in os.environ["XLA_FLAGS"]
    assert len(jax.devices()) >= 1  # XLA accepted the flags (an unknown flag aborts)


def test_user_flags_and_opt_out_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert xla_setup.apply_default_xla_flags() == []
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("PRELAR_XLA_DEFAULTS", "0")
    assert xla_setup.apply_default_xla_flags() == [] and os.environ["XLA_FLAGS"] == ""


def test_fresh_process_gets_the_flag_before_the_backend_starts():
    code = "import os, jax, prelar_jax; jax.devices(); print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    import jax

    if jax.lib.__version__.startswith("0.10."):
        assert "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" in out
