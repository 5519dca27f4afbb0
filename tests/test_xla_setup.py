"""Process settings: the default XLA flags (only for checked jaxlib versions, never overriding the
user's) and the tcmalloc re-execution."""

import os
import subprocess
import sys

import pytest

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


def test_allocator_environment_preloads_tcmalloc_when_installed():
    lib = xla_setup.TCMALLOC_PATHS[0]
    exists = lambda path: path == lib
    assert xla_setup.allocator_environment({}, exists) == {"LD_PRELOAD": lib}
    assert xla_setup.allocator_environment({"LD_PRELOAD": "/x/libfoo.so"}, exists) == {
        "LD_PRELOAD": f"{lib} /x/libfoo.so"
    }
    # Nothing to change: already preloaded (so a re-executed program does not loop), or opted out.
    assert xla_setup.allocator_environment({"LD_PRELOAD": lib}, exists) is None
    assert xla_setup.allocator_environment({"PRELAR_MALLOC": "system"}, exists) is None
    # Not installed: auto keeps glibc's malloc; asking for tcmalloc says how to install it.
    assert xla_setup.allocator_environment({}, lambda path: False) is None
    with pytest.raises(xla_setup.AllocatorError, match="libtcmalloc-minimal4"):
        xla_setup.allocator_environment({"PRELAR_MALLOC": "tcmalloc"}, lambda path: False)
    with pytest.raises(xla_setup.AllocatorError, match="choose one of"):
        xla_setup.allocator_environment({"PRELAR_MALLOC": "jemalloc"}, exists)


@pytest.mark.skipif(not any(os.path.exists(p) for p in xla_setup.TCMALLOC_PATHS), reason="tcmalloc not installed")
def test_use_fast_allocator_reexecutes_once_with_the_same_arguments():
    code = (
        "import os, sys; from prelar_jax.runtime import xla_setup; xla_setup.use_fast_allocator(); "
        "print(os.environ.get('LD_PRELOAD', ''), sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PRELAR_MALLOC")}
    run = lambda env: (
        subprocess.run(
            [sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    assert "tcmalloc" in run(env) and "['a', '--b=1']" in run(env)
    assert run({**env, "PRELAR_MALLOC": "system"}).startswith(" ['a', '--b=1']")
