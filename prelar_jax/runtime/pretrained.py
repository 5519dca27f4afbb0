"""Reading saved runs: pre-trained modules into a fresh fine-tuning agent (``load_pretrained``,
with a report of what was loaded), and the config and latest state of a pre-training or
fine-tuning workdir (``read_*_config``, ``restore_*_state``), with one clear error
(``PretrainedNotFoundError``, ``PretrainedMismatchError``) for a workdir that cannot serve."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from prelar_jax.runtime import checkpoint
from prelar_jax.learners.finetune import PRETRAINED_MODULES, FinetuneAgent
from prelar_jax.errors import UserError
from prelar_jax.learners.pretrain import PretrainModel, make_optimizer
from prelar_jax.types import Params


class PretrainedMismatchError(checkpoint.CheckpointMismatchError):
    """The pre-trained modules do not fit the fine-tuning agent (another architecture or preset)."""


class PretrainedNotFoundError(UserError, FileNotFoundError):
    """``pretrained`` does not point at a pre-training workdir with a finished checkpoint."""


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[prefix + "/" + "/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return flat


def load_pretrained(
    pretrained_workdir: str,
    params: Params,
    batch_stats: Params,
    finetune_model_config: ml_collections.ConfigDict,
    modules: dict[str, str] | None = None,
) -> tuple[Params, Params, dict[str, list[str]]]:
    """Copies ``modules`` (pre-training name -> agent name; default: encoder, decoder and RSSM
    under their own names) with their parameters and BatchNorm statistics from the latest
    checkpoint of a pre-training workdir into fresh agent ``params``/``batch_stats`` (host arrays).

    Returns the new trees and a report ``{'loaded', 'initialised', 'ignored'}`` of parameter
    paths. Raises ``PretrainedMismatchError`` naming every differing shape (and the config keys
    that differ) when the pre-trained modules do not fit, and ``FileNotFoundError`` with what to
    do when the workdir has no config or checkpoint (``PretrainedNotFoundError``).
    """
    from prelar_jax.runtime import config as config_lib  # local: config imports nets only

    workdir = os.path.abspath(pretrained_workdir)
    pre_config, pre_params, pre_stats, step = restore_pretrain_state(workdir)
    differences = [
        f"model.{k}: pre-training {pre_config.model[k]!r}, fine-tuning {finetune_model_config[k]!r}"
        for k in sorted(finetune_model_config)
        if k in pre_config.model
        and k not in ("compute_dtype", "remat")
        and pre_config.model[k] != finetune_model_config[k]
    ]
    modules = {name: name for name in PRETRAINED_MODULES} if modules is None else modules
    new_params, new_stats = dict(params), dict(batch_stats)
    problems, loaded, used = [], [], []
    for source, target in modules.items():
        for tree, new_tree, label in ((pre_params, new_params, "params"), (pre_stats, new_stats, "batch_stats")):
            if source not in tree and target not in new_tree:
                continue
            saved = _flat(tree.get(source, {}), f"{label}/{target}")
            wanted = _flat(new_tree.get(target, {}), f"{label}/{target}")
            for path in sorted(set(saved) | set(wanted)):
                if path not in saved or path not in wanted:
                    where = "missing in the pre-trained model" if path not in saved else "not in the agent"
                    problems.append(f"  {path}: {where}")
                elif saved[path].shape != wanted[path].shape:
                    problems.append(
                        f"  {path}: pre-trained {tuple(saved[path].shape)}, agent {tuple(wanted[path].shape)}"
                    )
            if not problems and source in tree:
                new_tree[target] = jax.tree.map(np.asarray, tree[source])
                loaded.extend(saved)
                used.extend(_flat(tree[source], f"{label}/{source}"))
    if problems:
        hint = ("\nDifferent model config keys:\n  " + "\n  ".join(differences)) if differences else ""
        raise PretrainedMismatchError(
            f"the pre-trained modules in {workdir} (step {step}) do not fit this "
            f"fine-tuning agent:\n"
            + "\n".join(problems[:20])
            + hint
            + "\nUse the fine-tuning preset matching the pre-training preset (e.g. both :tiny), and "
            "make action_encoder.code_size equal the pre-trained implicit-action code size."
        )
    all_agent = set(_flat(new_params, "params")) | set(_flat(new_stats, "batch_stats"))
    report = {
        "loaded": sorted(loaded),
        "initialised": sorted(all_agent - set(loaded)),
        "ignored": sorted((set(_flat(pre_params, "params")) | set(_flat(pre_stats, "batch_stats"))) - set(used)),
        "step": step,
        # The pre-training's video frame stride: its dynamics ran at this many environment steps.
        "frame_stride": config_lib.frame_stride(pre_config),
    }
    return new_params, new_stats, report


def _read_config(workdir: str | os.PathLike, stage: str, script: str, block: str) -> ml_collections.ConfigDict:
    """The resolved ``config.json`` of a ``stage`` workdir (one that ``script`` writes, whose
    config has the ``block`` key); ``PretrainedNotFoundError`` saying what to pass instead."""
    from prelar_jax.runtime import config as config_lib  # local: config imports nets only

    workdir = os.path.abspath(os.fspath(workdir))
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise PretrainedNotFoundError(
            f"{stage} workdir {workdir}: {config_path} does not exist. Pass the --workdir of a {stage} run ({script})."
        )
    try:
        config = config_lib.config_from_json(config_path)
    except (OSError, ValueError) as error:
        raise PretrainedNotFoundError(
            f"cannot read {config_path} ({error}); pass a {stage} workdir whose config.json is intact."
        ) from error
    if block not in config:
        raise PretrainedNotFoundError(
            f"{workdir} is not a {stage} workdir (its config.json has method "
            f"{config.get('method')!r} and no {block} block)."
        )
    return config


def _restore_latest(workdir: str, stage: str, abstract: Any, only: tuple[str, ...]) -> tuple[Any, int]:
    """The fields ``only`` of the latest checkpoint under ``<workdir>/checkpoints``, shaped like
    ``abstract``, on the host CPU device, and its step (from the checkpoint's metadata)."""
    # A reader: the pre-training may still be running and writing its next checkpoint.
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, remove_unfinished=False)
    try:
        latest = ckpt.latest_step()
        if latest is None:
            raise PretrainedNotFoundError(
                f"{workdir} has no finished checkpoint under {workdir}/checkpoints; let "
                f"{stage} save one (log.checkpoint_every) first."
            )
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), abstract)
        restored, metadata = ckpt.restore(target, only=only)
    finally:
        ckpt.close()
    return restored, int(metadata.get("step", latest))


def read_pretrain_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config (``config.json``) of a pre-training workdir; raises
    ``PretrainedNotFoundError`` saying what to pass instead when it is missing, unreadable or
    written by a fine-tuning run."""
    return _read_config(workdir, "pre-training", "experiments/pretrain.py", "implicit_action")


def restore_pretrain_state(workdir: str | os.PathLike) -> tuple[ml_collections.ConfigDict, Params, Params, int]:
    """``(config, params, batch_stats, step)`` of the latest checkpoint of a pre-training workdir,
    on the host CPU device.

    The checkpoint is checked against the TrainState its own config.json builds, but only the
    step, parameters and BatchNorm statistics are read: the Adam moments (twice the parameters'
    size) are neither read from disk nor allocated. Errors are ``PretrainedNotFoundError`` with
    what to pass instead.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    config = read_pretrain_config(workdir)
    model = PretrainModel(config)
    abstract = jax.eval_shape(lambda k: model.init_state(k, make_optimizer(config)), jax.random.key(0))
    restored, step = _restore_latest(workdir, "pre-training", abstract, ("step", "params", "batch_stats"))
    return config, restored.params, restored.batch_stats, step


def weights_sha256(params: Params, batch_stats: Params) -> str:
    """sha256 over every parameter and BatchNorm statistic (path, dtype, shape and bytes, in path
    order): equal exactly when two states hold bit-identical weights."""
    flat = {**_flat(params, "params"), **_flat(batch_stats, "batch_stats")}
    digest = hashlib.sha256()
    for path in sorted(flat):
        array = np.ascontiguousarray(np.asarray(flat[path]))
        digest.update(f"{path}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def pretrain_weights_sha256(workdir: str | os.PathLike) -> tuple[str, int]:
    """``(weights_sha256, step)`` of the latest checkpoint of a pre-training workdir."""
    _, params, batch_stats, step = restore_pretrain_state(workdir)
    return weights_sha256(params, batch_stats), step


def read_finetune_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config (``config.json``) of a fine-tuning workdir; ``PretrainedNotFoundError``
    saying what to pass instead when it is missing, unreadable or written by pre-training."""
    return _read_config(workdir, "fine-tuning", "experiments/finetune.py", "actor_critic")


def restore_finetune_state(workdir: str | os.PathLike) -> tuple[ml_collections.ConfigDict, Params, Params, int]:
    """``(config, params, batch_stats, step)`` of the latest checkpoint of a fine-tuning workdir,
    on the host CPU device; only the step, parameters and BatchNorm statistics are read (not the
    optimiser moments). ``step`` is the environment step the checkpoint was written at."""
    workdir = os.path.abspath(os.fspath(workdir))
    config = read_finetune_config(workdir)
    agent = FinetuneAgent(config)
    abstract = jax.eval_shape(lambda k: agent.init_state(k), jax.random.key(0))
    # A model without BatchNorm (the plain CNN) has empty statistics: nothing to read there.
    only = ("params", "batch_stats") if jax.tree.leaves(abstract.batch_stats) else ("params",)
    restored, step = _restore_latest(workdir, "fine-tuning", abstract, only)
    return config, restored.params, restored.batch_stats, step


def summarise_report(report: dict[str, Any], action_repeat: int = 1) -> str:
    """One line per module: how many arrays were loaded / newly initialised / ignored, and a note
    when the pre-training's frame stride is not the fine-tuning's ``action_repeat``."""

    def by_module(paths):
        counts: dict[str, int] = {}
        for path in paths:
            module = "/".join(path.split("/")[:2])
            counts[module] = counts.get(module, 0) + 1
        return ", ".join(f"{m} ({n})" for m, n in sorted(counts.items())) or "none"

    stride = report.get("frame_stride", 1)
    note = (
        (
            f"\nnote: pre-trained with data.frame_stride={stride}: one step of its dynamics spanned {stride} "
            f"video frames, while fine-tuning applies each action for {action_repeat} control step(s) "
            f"(--config.env.action_repeat={stride} would match them)"
        )
        if stride != action_repeat
        else ""
    )
    return (
        f"loaded from pre-training step {report['step']}: {by_module(report['loaded'])}\n"
        f"newly initialised: {by_module(report['initialised'])}\n"
        f"ignored (not used by fine-tuning): {by_module(report['ignored'])}" + note
    )
