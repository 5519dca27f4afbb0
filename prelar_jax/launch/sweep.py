"""Hyperparameter sweeps declared in config files (``configs/sweeps/*.py``).

A sweep file defines ``get_sweep()`` returning a dict::

    {"base": "configs/prelar_finetune.py:tiny",   # config file and preset every run starts from
     "script": "experiments/finetune.py",         # optional; this is the default
     "fixed": {"task": "reach"},                   # optional; overrides for every run, not in names
     "grid": {"loss.kl_scale": [0.5, 1.0], "seed": [0, 1]},   # cartesian product
     "list": [{"intrinsic.beta": 0.0}, {"intrinsic.beta": 1.0, "loss.aux_reward_scale": 0.0}]}

``grid`` alone is its cartesian product, ``list`` alone its entries, both: every list entry crossed
with the grid (a key may not be in both). Each run gets ``<out>/<name>`` as its workdir, where the
name lists its overrides in declaration order (``kl_scale=0.5,seed=0``; the last part of the
dotted key unless two keys of the sweep share it). Every key and value is checked against the
base config before anything runs, so a typo fails at once with one message naming the sweep file
and the key, instead of eight runs later.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import os
import re
import shlex
import sys
from typing import Any, Mapping, Sequence

import ml_collections

from prelar_jax.runtime import config as config_lib
from prelar_jax.errors import UserError
from prelar_jax.launch.runner import RunSpec

DEFAULT_SCRIPT = "experiments/finetune.py"
SWEEP_KEYS = ("base", "script", "fixed", "grid", "list")
_MAX_NAME = 120  # characters; longer names are cut and made unique with a hash
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-]")


class SweepError(UserError, ValueError):
    """A sweep file that cannot be expanded; the message names the file and the key."""


def load_sweep(path: str) -> dict[str, Any]:
    """Runs the sweep file ``path`` and returns its ``get_sweep()`` (checked by ``expand``)."""
    resolved = _resolve(path)
    if resolved is None:
        raise SweepError(f"sweep file {path!r} not found (expected e.g. configs/sweeps/example.py)")
    module_spec = importlib.util.spec_from_file_location(f"_sweep_{abs(hash(resolved))}", resolved)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # sweep files are Python and run as code
    except SyntaxError as error:
        raise SweepError(f"sweep file {path}: {error}") from error
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"sweep file {path} defines no get_sweep() function returning the sweep dict")
    sweep = module.get_sweep()
    if not isinstance(sweep, Mapping):
        raise SweepError(f"sweep file {path}: get_sweep() must return a dict, got {type(sweep).__name__}")
    return dict(sweep)


def _resolve(path: str) -> str | None:
    """``path`` made absolute: as given (from the working directory), else from the repository
    root, like ``config.load_config``; None if neither exists."""
    for candidate in (path, os.path.join(config_lib.REPO_ROOT, path)):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return None


def flag_value(value: Any) -> str:
    """``value`` as ml_collections' ``--config.key=`` flag parsers read it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    if isinstance(value, str):
        return value
    return repr(value)


def _check_structure(sweep: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"sweep {source}: unknown top-level key(s) {unknown}; allowed: {list(SWEEP_KEYS)}")
    if not isinstance(sweep.get("base"), str) or not sweep["base"]:
        raise SweepError(
            f"sweep {source}: 'base' must name the config every run starts from, e.g. 'configs/prelar_finetune.py:tiny'"
        )
    if "grid" not in sweep and "list" not in sweep:
        raise SweepError(
            f"sweep {source}: give a 'grid' (dict of key -> list of values) and/or a 'list' (list of override dicts)"
        )
    for name in ("fixed", "grid"):
        if not isinstance(sweep.get(name, {}), Mapping):
            raise SweepError(
                f"sweep {source}: {name!r} must be a dict of config key -> {'values' if name == 'grid' else 'value'}"
            )
    for key, values in sweep.get("grid", {}).items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise SweepError(f"sweep {source}: grid key {key!r} needs a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise SweepError(f"sweep {source}: grid key {key!r} lists a value twice: {list(values)!r}")
    entries = sweep.get("list", [])
    if (
        isinstance(entries, (str, bytes, Mapping))
        or not isinstance(entries, Sequence)
        or ("list" in sweep and not entries)
    ):
        raise SweepError(f"sweep {source}: 'list' must be a non-empty list of override dicts")
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise SweepError(f"sweep {source}: list entry {index} must be a dict of overrides, got {entry!r}")
        both = sorted(set(entry) & set(sweep.get("grid", {})))
        if both:
            raise SweepError(
                f"sweep {source}: list entry {index} sets {both}, which the grid also sweeps; "
                "each key belongs to the grid or the list, not both"
            )
        both = sorted(set(entry) & set(sweep.get("fixed", {})))
        if both:
            raise SweepError(f"sweep {source}: list entry {index} sets {both}, which 'fixed' also sets")
    both = sorted(set(sweep.get("grid", {})) & set(sweep.get("fixed", {})))
    if both:
        raise SweepError(f"sweep {source}: {both} are both in 'grid' and in 'fixed'")


def override_sets(sweep: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The swept overrides of every run, in order: list entries outermost, then the grid's
    cartesian product with its last key varying fastest. (``fixed`` is not included.)"""
    grid = dict(sweep.get("grid", {}))
    entries = list(sweep.get("list", [{}]))
    product = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [{**entry, **point} for entry in entries for point in product]


def _apply(
    base: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str, source: str, base_spec: str
) -> ml_collections.ConfigDict:
    """A copy of ``base`` with ``overrides``; a SweepError naming ``source`` and the key if a key
    does not exist, is a group of keys, or the value has the wrong type."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        prefix = f"sweep {source}: {where}: key {key!r}"
        if not isinstance(key, str) or not key:
            raise SweepError(f"sweep {source}: {where}: config keys must be dotted strings, got {key!r}")
        if isinstance(value, Mapping):
            raise SweepError(f"{prefix}: values must be numbers, strings, booleans or lists, got a dict")
        try:
            current = _lookup(config, key)
            if isinstance(current, ml_collections.ConfigDict):
                raise SweepError(
                    f"{prefix} is a group of keys in {base_spec}; sweep one of its leaves "
                    f"({', '.join(f'{key}.{k}' for k in sorted(current.keys()))})"
                )
            config_lib.set_path(config, key, value)
        except config_lib.ConfigError as error:  # the key does not exist; the message lists valid ones
            raise SweepError(f"sweep {source}: {where}: {error} (base config {base_spec})") from error
        except TypeError as error:  # ml_collections refuses a value of another type
            raise SweepError(f"{prefix}: cannot set {value!r} in {base_spec}: {error}") from error
    return config


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value at dotted ``key``, or None where the path does not exist (``set_path`` then
    raises the ConfigError that names the valid keys)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's name in run names: its last dotted part, or the whole key where that is shared."""
    last = [key.split(".")[-1] for key in keys]
    return {key: (short if last.count(short) == 1 else key) for key, short in zip(keys, last)}


def _run_name(overrides: Mapping[str, Any], short: Mapping[str, str]) -> str:
    if not overrides:
        return "base"
    name = ",".join(f"{short[key]}={flag_value(value)}" for key, value in overrides.items())
    return _NAME_UNSAFE.sub("_", name)


def _unique_names(names: list[str], overrides: list[dict[str, Any]]) -> list[str]:
    """Names cut to ``_MAX_NAME`` and, where cutting or cleaning characters made two equal, made
    unique with a hash of the full overrides (deterministic across runs of the sweep)."""

    def digest(index: int) -> str:
        return hashlib.sha1(repr(sorted(overrides[index].items())).encode()).hexdigest()[:8]

    out = [name if len(name) <= _MAX_NAME else f"{name[: _MAX_NAME - 9]}-{digest(i)}" for i, name in enumerate(names)]
    for name in set(out):
        clashing = [i for i, n in enumerate(out) if n == name]
        if len(clashing) > 1:
            for i in clashing:
                out[i] = f"{name[: _MAX_NAME - 9]}-{digest(i)}"
    return out


def expand(
    sweep: Mapping[str, Any], out_dir: str, source: str = "<sweep>", python: str = sys.executable
) -> list[RunSpec]:
    """One ``RunSpec`` per run of ``sweep`` (see the module docstring), workdirs under ``out_dir``.

    Commands use absolute paths (interpreter, script, config file, workdir) so that printed
    command lines work from any directory. Labels: ``method`` (the config's method, plus
    ``/<overrides other than task and seed>`` when there are any, so that results.csv tells the
    variants apart), ``task``, ``seed``, ``variant`` and ``overrides``.
    """
    _check_structure(sweep, source)
    base_spec = sweep["base"]
    try:
        base = config_lib.load_config(base_spec)
    except config_lib.ConfigError as error:
        raise SweepError(f"sweep {source}: 'base': {error}") from error
    script = sweep.get("script", DEFAULT_SCRIPT)
    script_path = _resolve(script) if isinstance(script, str) else None
    if script_path is None:
        raise SweepError(f"sweep {source}: 'script' {script!r} not found (e.g. {DEFAULT_SCRIPT!r})")
    config_path, _, preset = base_spec.partition(":")
    config_arg = _resolve(config_path) + (f":{preset}" if preset else "")
    fixed = dict(sweep.get("fixed", {}))
    base = _apply(base, fixed, "'fixed'", source, base_spec)

    # Each key and value where it is declared, so that an error points at the line to fix.
    for key, values in sweep.get("grid", {}).items():
        for value in values:
            _apply(base, {key: value}, "'grid'", source, base_spec)
    for index, entry in enumerate(sweep.get("list", [])):
        _apply(base, entry, f"'list' entry {index}", source, base_spec)

    points = override_sets(sweep)
    all_keys = list(dict.fromkeys(key for point in points for key in point))
    short = _short_keys(all_keys)
    variant_short = _short_keys([key for key in all_keys if key not in ("task", "seed")])
    names = _unique_names([_run_name(point, short) for point in points], points)
    seen: dict[str, int] = {}
    for index, point in enumerate(points):
        key = repr(sorted(point.items(), key=lambda item: item[0]))
        if key in seen:
            raise SweepError(f"sweep {source}: runs {seen[key]} and {index} have the same overrides {point}")
        seen[key] = index

    out_dir = os.path.abspath(out_dir)
    specs = []
    for index, (name, point) in enumerate(zip(names, points)):
        where = f"run {index} ({name})"
        config = _apply(base, point, where, source, base_spec)
        variant_overrides = {k: v for k, v in point.items() if k not in ("task", "seed")}
        variant = _run_name(variant_overrides, variant_short) if variant_overrides else ""
        method = config.get("method", "run")
        workdir = os.path.join(out_dir, name)
        command = [python, script_path, f"--config={config_arg}"]
        command += [f"--config.{key}={flag_value(value)}" for key, value in {**fixed, **point}.items()]
        command.append(f"--workdir={workdir}")
        labels = {
            "method": f"{method}/{variant}" if variant else method,
            "task": config.get("task", ""),
            "seed": config.get("seed", ""),
            "variant": variant,
            "overrides": dict(point),
        }
        specs.append(RunSpec(name=name, command=command, workdir=workdir, labels=labels))
    return specs


def command_line(spec: RunSpec) -> str:
    """``spec.command`` as one shell-quoted line (for a cluster scheduler)."""
    return shlex.join(spec.command)
