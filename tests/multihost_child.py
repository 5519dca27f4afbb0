"""One process of tests/test_multihost.py's two-process run: ``python tests/multihost_child.py
SCRIPT ARGS...`` runs SCRIPT (``experiments/pretrain.py``) as ``__main__`` with ARGS, unchanged,
except that this process writes XLA's persistent compilation cache even when it is not process 0.

Why: JAX writes cache entries from process 0 only, and on CPU the other process's cache key
differs (it hashes that process's view of the device topology), so process 1 never finds its
compiled step and compiles it anew on every test run: 30-90 s of CPU on the 2-core test machine,
while process 0 waits for it. Written here, the entry is read by process 1 of the next run (the
same key). Nothing else changes: same script, flags, environment and computation. If a JAX
version lays out these internals differently, the patch is skipped and process 1 compiles as
before.
"""

import inspect
import runpy
import sys


def _every_process_writes_the_compilation_cache() -> None:
    try:
        from jax._src import compilation_cache, compiler, config, distributed

        original = compiler._cache_write
        signature = inspect.signature(original)
        if not {"cache_key", "compile_time_secs", "module_name", "backend", "executable", "host_callbacks"} <= set(
            signature.parameters
        ):
            return
    except (ImportError, AttributeError, ValueError, TypeError):
        return

    def cache_write(*args, **kwargs):
        original(*args, **kwargs)  # process 0 writes; any other process returns without writing
        if distributed.global_state.process_id == 0:
            return
        try:
            a = signature.bind(*args, **kwargs).arguments
            if (
                not a["host_callbacks"]
                and a["compile_time_secs"] >= config.persistent_cache_min_compile_time_secs.value
            ):
                compilation_cache.put_executable_and_time(
                    a["cache_key"], a["module_name"], a["executable"], a["backend"], int(a["compile_time_secs"])
                )
        except Exception as error:  # a cache that cannot be written only costs time
            print(f"[multihost_child] not cached: {type(error).__name__}: {error}", file=sys.stderr)

    compiler._cache_write = cache_write


if __name__ == "__main__":
    _every_process_writes_the_compilation_cache()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
