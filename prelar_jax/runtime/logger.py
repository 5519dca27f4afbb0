"""Run logging: ``metrics.jsonl``, optional Weights & Biases, console progress, resolved configs.

Every run directory gets ``metrics.jsonl`` with one JSON object per ``log`` call, always with an
integer ``step``. Values are plain Python numbers; non-finite floats are written as the strings
``"nan"``, ``"inf"`` and ``"-inf"`` (bare ``NaN`` is not valid JSON and ``null`` would hide which
one happened). Only process 0 writes anything, so multi-host runs produce one log.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import jax
import numpy as np

from prelar_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"
CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
WANDB_MODES = ("offline", "online", "disabled")


class ConfigMismatchError(UserError, ValueError):
    """A workdir is being resumed with a config that differs in keys that matter."""


def _plain_value(key: str, value: Any) -> bool | int | float | str:
    """One metric as a plain Python scalar (numpy/jax 0-d arrays included)."""
    if isinstance(value, (bool, int, float, str)) and not isinstance(value, np.generic):
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise TypeError(
            f"metric {key!r} must be a scalar, got an array of shape {array.shape}; reduce it (e.g. mean) "
            "before logging."
        )
    item = array.reshape(()).item()
    if not isinstance(item, (bool, int, float)):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}.")
    return item


def _json_value(value: bool | int | float | str) -> bool | int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def truncate_metrics_after(path: str | os.PathLike, step: int) -> int:
    """Drops lines with ``step`` greater than ``step`` (and unparsable ones); returns how many were dropped.

    Those lines were written after the checkpoint a run resumes from, so the resumed run will log
    those steps again. The file is replaced atomically so a crash here cannot lose the kept lines.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False  # A line cut short by a crash, or not ours.
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)
    return dropped


class MetricsLogger:
    """Writes metrics to ``<workdir>/metrics.jsonl``, W&B and the console.

    On a TTY the console shows a tqdm bar over ``total_steps``; otherwise (log files, clusters) one
    line every ``console_every`` steps with progress, up to four metrics, steps/s and ETA.
    ``console_keys`` chooses the metrics shown; by default the first four of each logged dict.
    A resumed run passes ``start_step`` (the restored checkpoint's step, which it must not log
    again); lines already logged for later steps are removed so no step appears twice.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        wandb_mode: str = "offline",
        wandb_project: str = "prelar-jax",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        console_every: int = 1000,
        console_keys: Sequence[str] | None = None,
        stream: TextIO | None = None,
        is_primary: bool | None = None,
    ):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}.")
        if console_every < 1:
            raise ValueError(f"console_every must be >= 1, got {console_every}.")
        self.workdir = os.fspath(workdir)
        self.total_steps = int(total_steps)
        self.console_every = int(console_every)
        self.console_keys = tuple(console_keys) if console_keys is not None else None
        self.is_primary = jax.process_index() == 0 if is_primary is None else bool(is_primary)
        self._stream = stream if stream is not None else sys.stderr
        self._file = None
        self._bar = None
        self._wandb_run = None
        self._warned: set[str] = set()
        self._last_step = int(start_step)
        self._last_print_step = int(start_step)
        self._last_print_time = time.monotonic()
        if not self.is_primary:
            return

        os.makedirs(self.workdir, exist_ok=True)
        self.metrics_path = os.path.join(self.workdir, METRICS_FILE)
        dropped = truncate_metrics_after(self.metrics_path, int(start_step))
        if dropped:
            self._console(f"resuming at step {start_step}: removed {dropped} later lines from {self.metrics_path}")
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if wandb_mode != "disabled":
            self._start_wandb(wandb_mode, wandb_project, run_name, dict(config) if config is not None else None)
        isatty = getattr(self._stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=int(start_step), file=self._stream, dynamic_ncols=True)

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _console(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def _start_wandb(self, mode: str, project: str, run_name: str | None, config: dict | None) -> None:
        """W&B is optional: if it cannot start, the run goes on with metrics.jsonl only."""
        try:
            import wandb

            id_path = os.path.join(self.workdir, WANDB_ID_FILE)
            if os.path.exists(id_path):
                with open(id_path, encoding="utf-8") as handle:
                    run_id = handle.read().strip()
            else:
                run_id = uuid.uuid4().hex[:16]
                with open(id_path, "w", encoding="utf-8") as handle:
                    handle.write(run_id + "\n")
            self._wandb_run = wandb.init(
                project=project, name=run_name, mode=mode, dir=self.workdir, config=config, resume="allow", id=run_id
            )
        except Exception as error:  # noqa: BLE001 - any failure (import, network, auth) means "no W&B".
            self._wandb_run = None
            self._warn_once("wandb", f"wandb could not start ({type(error).__name__}: {error}); logging without it.")

    def _wandb_call(self, function, *args, **kwargs) -> None:
        if self._wandb_run is None:
            return
        try:
            function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            self._warn_once("wandb", f"wandb failed ({type(error).__name__}: {error}); logging without it.")
            self._wandb_run = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records ``metrics`` for ``step``: one JSON line, one W&B row and console progress."""
        if not self.is_primary:
            return
        step = int(step)
        host_metrics = jax.device_get(dict(metrics))  # One transfer for all device scalars.
        values = {key: _plain_value(key, value) for key, value in host_metrics.items() if key != "step"}
        record = {"step": step, **{key: _json_value(value) for key, value in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._wandb_call(lambda: self._wandb_run.log(values, step=step))
        self._progress(step, values)

    def _shown(self, values: dict[str, Any]) -> list[tuple[str, Any]]:
        keys = self.console_keys if self.console_keys is not None else list(values)[:4]
        return [(key, values[key]) for key in keys if key in values]

    def _progress(self, step: int, values: dict[str, Any]) -> None:
        shown = self._shown(values)
        if self._bar is not None:
            if step > self._last_step:
                self._bar.update(step - self._last_step)
            if shown:
                self._bar.set_postfix(
                    {key: f"{value:.4g}" if isinstance(value, float) else value for key, value in shown}
                )
        elif step - self._last_print_step >= self.console_every or (step >= self.total_steps > self._last_print_step):
            now = time.monotonic()
            rate = (step - self._last_print_step) / max(now - self._last_print_time, 1e-9)
            eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
            parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
            parts += [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in shown]
            parts += [f"{rate:.2f} steps/s", f"ETA {_format_duration(eta) if math.isfinite(eta) else '?'}"]
            self._console(" | ".join(parts))
            self._last_print_step, self._last_print_time = step, now
        self._last_step = max(self._last_step, step)

    def log_media(self, step: int, name: str, path: str | os.PathLike) -> None:
        """Sends an image file (e.g. a prediction grid PNG) to W&B; the file itself stays in the workdir."""
        if not self.is_primary or self._wandb_run is None:
            return
        import wandb

        self._wandb_call(lambda: self._wandb_run.log({name: wandb.Image(os.fspath(path))}, step=int(step)))

    def log_video(self, step: int, name: str, path: str | os.PathLike, caption: str = "") -> None:
        """Sends a GIF (e.g. an evaluation episode) to W&B; the file itself stays in the workdir."""
        if not self.is_primary or self._wandb_run is None:
            return
        import wandb

        self._wandb_call(
            lambda: self._wandb_run.log(
                {name: wandb.Video(os.fspath(path), format="gif", caption=caption or None)}, step=int(step)
            )
        )

    def close(self) -> None:
        """Flushes and closes the metrics file, the progress bar and the W&B run."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb_run is not None:
            self._wandb_call(self._wandb_run.finish)
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _jsonable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as JSON would store it (tuples become lists), so a saved and a live config compare equal."""
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    return json.loads(json.dumps(dict(config), default=_json_default, sort_keys=True))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)  # Types, callables, paths: compared by their text.


def write_config(workdir: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Writes the resolved config as ``config.json`` (read back on resume) and ``config.yaml`` (for people)."""
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    plain = _jsonable_config(config)
    _atomic_write(os.path.join(workdir, CONFIG_JSON), json.dumps(plain, indent=2, sort_keys=True) + "\n")
    try:
        import yaml
    except ImportError:
        return
    _atomic_write(os.path.join(workdir, CONFIG_YAML), yaml.safe_dump(plain, sort_keys=True, default_flow_style=False))


def atomic_write_json(path: str, value: Any) -> None:
    """``value`` as indented JSON, written to a temporary name and renamed (never half-written)."""
    _atomic_write(path, json.dumps(value, indent=2, sort_keys=True, default=_json_default) + "\n")


def _atomic_write(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = (), added: Mapping[str, Any] | None = None
) -> dict[str, tuple]:
    """``{dotted.key: (old, new)}`` for leaves that differ, skipping ignored keys.

    An ``ignore`` entry matches a dotted key exactly, as a glob (``*.steps``), or as a prefix
    (``wandb`` ignores ``wandb.project``). Missing leaves show as ``"<missing>"``, except the keys
    of ``added`` (``{dotted.key: value}``: keys the code gained after ``old`` was saved, and the
    value with which code without them ran): where ``old`` lacks one that ``new`` has, ``old`` ran
    with that value.
    """
    flat_old, flat_new = _flatten(_jsonable_config(old)), _flatten(_jsonable_config(new))
    flat_old = {**{k: v for k, v in (added or {}).items() if k in flat_new}, **flat_old}

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) or key.startswith(pattern + ".") for pattern in ignore)

    missing = "<missing>"
    return {
        key: (flat_old.get(key, missing), flat_new.get(key, missing))
        for key in sorted(flat_old.keys() | flat_new.keys())
        if not ignored(key) and flat_old.get(key, missing) != flat_new.get(key, missing)
    }


def check_config_matches(
    workdir: str | os.PathLike,
    config: Mapping[str, Any],
    allow_override: bool,
    ignore: Sequence[str] = (),
    override_flag: str = "--allow_config_override",
    added: Mapping[str, Any] | None = None,
) -> list[str]:
    """Refuses to resume a workdir whose saved ``config.json`` differs from ``config`` in keys that matter.

    Returns the differing keys (empty when there is no saved config or nothing differs). With
    ``allow_override`` the differences only produce a warning, and the caller should then
    ``write_config`` the new config. ``added``: see ``config_differences`` (a saved config
    without a key added since ran with its value there).
    """
    path = os.path.join(os.fspath(workdir), CONFIG_JSON)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigMismatchError(
            f"cannot read {path} ({error}); it is not the config this workdir was written with. Restore "
            f"it, or pass a new --workdir (the checkpoints in {os.fspath(workdir)} are untouched)."
        ) from error
    differences = config_differences(saved, config, ignore, added)
    if not differences:
        return []
    listing = "\n".join(f"  {key}: {old!r} (saved) -> {new!r} (now)" for key, (old, new) in differences.items())
    if not allow_override:
        raise ConfigMismatchError(
            f"workdir {os.fspath(workdir)} was created with a different config; these keys differ:\n{listing}\n"
            f"Pass a new --workdir to start a separate run, or pass {override_flag} to resume this one with the "
            "new values."
        )
    warnings.warn(f"resuming {os.fspath(workdir)} with config changes:\n{listing}", RuntimeWarning, stacklevel=2)
    return list(differences)
