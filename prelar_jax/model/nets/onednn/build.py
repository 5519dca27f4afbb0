"""Builds the oneDNN convolution extension (``conv.cc``) next to this file.

    python -m prelar_jax.model.nets.onednn.build [--quiet-missing]

Needs a C++17 compiler and the oneDNN headers and library (Debian: ``apt-get install g++
libdnnl-dev``). ``--quiet-missing`` exits 0 with one line when they are absent (the setup script
uses it: without the extension every convolution runs on XLA's own kernels).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import jax

from prelar_jax.model.nets import onednn

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conv.cc")
HEADER = "oneapi/dnnl/dnnl.hpp"


def missing() -> str | None:
    """What the build lacks, in words; None when it can run."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}); Debian: apt-get install g++"
    probe = subprocess.run(
        [compiler, "-x", "c++", "-std=c++17", "-fsyntax-only", "-"],
        input=f"#include <{HEADER}>\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"no oneDNN headers ({HEADER}); Debian: apt-get install libdnnl-dev"
    return None


def build(output: str = onednn.LIBRARY) -> str:
    compiler = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, os.path.basename(output))
        command = [
            compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
            f"-I{jax.ffi.include_dir()}", SOURCE, "-ldnnl", "-o", target,
        ]  # fmt: skip
        subprocess.run(command, check=True)
        os.replace(target, output)  # whole file or nothing: a running process never sees half a library
    return output


def main(argv: list[str]) -> int:
    reason = missing()
    if reason is not None:
        if "--quiet-missing" in argv:
            print(f"[onednn] not built ({reason}): convolutions run on XLA's kernels")
            return 0
        print(f"[onednn] cannot build: {reason}", file=sys.stderr)
        return 1
    print(f"[onednn] built {build()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
