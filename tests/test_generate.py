"""Meta-World task wrapper and expert-video generation (renders a few dozen 64x64 frames)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from prelar_jax.data import generate
from prelar_jax.data.videos import NpzEpisodeDataset
from prelar_jax.envs import metaworld as mw


def test_task_lists_match_metaworld() -> None:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    assert sorted(mw.TASK_NAMES) == sorted(k.removesuffix("-v3") for k in ALL_V3_ENVIRONMENTS)
    assert len(mw.BENCHMARK_TASKS) == 10 and set(mw.BENCHMARK_TASKS) <= set(mw.TASK_NAMES)
    assert len(generate.DEFAULT_TASKS) == 40 and not set(generate.DEFAULT_TASKS) & set(mw.BENCHMARK_TASKS)


def test_task_names_with_or_without_suffix() -> None:
    assert mw.canonical_task_name("drawer-open-v3") == "drawer-open"
    assert mw.canonical_task_name("drawer-open") == "drawer-open"
    assert mw.canonical_task_name("drawer_open") == "drawer-open"
    with pytest.raises(mw.UnknownTaskError, match="button-press-topdown-wall") as info:
        mw.canonical_task_name("drawer-open-v2")
    assert isinstance(info.value, ValueError)


def test_missing_rendering_backend_gives_install_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mw, "_CHECKED_BACKEND", None)
    monkeypatch.setattr(mw, "_probe_backend", lambda backend, timeout=60.0: "libEGL.so.1: cannot open shared object")
    with pytest.raises(mw.RenderingBackendError) as info:
        mw.check_rendering_backend()
    msg = str(info.value)
    for needle in ("libegl1 libegl-mesa0 libgl1", "libosmesa6", "experiments/setup_env.sh", "MUJOCO_GL=egl"):
        assert needle in msg


def test_backend_falls_back_to_osmesa_before_mujoco_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mw, "_CHECKED_BACKEND", None)
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setenv("PYOPENGL_PLATFORM", "egl")
    monkeypatch.delitem(sys.modules, "mujoco", raising=False)  # restored after the test
    tried = []

    def probe(backend: str, timeout: float = 60.0) -> str | None:
        tried.append(backend)
        return None if backend == "osmesa" else "no EGL device"

    monkeypatch.setattr(mw, "_probe_backend", probe)
    assert mw.check_rendering_backend() == "osmesa"
    assert tried == ["egl", "osmesa"]
    assert os.environ["MUJOCO_GL"] == "osmesa" and os.environ["PYOPENGL_PLATFORM"] == "osmesa"


def test_metaworld_task_step_contract() -> None:
    with mw.MetaWorldTask("reach-v3", seed=0, time_limit=5) as env:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        obs = env.reset(seed=1)
        assert obs["is_first"] and not obs["is_last"] and not obs["is_terminal"]
        assert obs["reward"] == 0.0 and obs["success"] is False
        assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
        assert obs["image"].mean() > 40  # not a blank frame (a lost GL context renders all black)
        assert obs["state"].shape == (39,)
        goal = obs["state"][36:39].copy()
        assert np.abs(goal).sum() > 0  # goal-observable
        for t in range(1, 6):
            obs = env.step(np.array([0.5, 0.0, -0.2, 1.0]))
            assert isinstance(obs["reward"], float) and isinstance(obs["success"], bool)
            assert not obs["is_first"] and not obs["is_terminal"]
            assert obs["is_last"] == (t == 5)
            # the goal must survive the per-step obs clipping (stale cached bounds would zero it)
            np.testing.assert_allclose(obs["state"][36:39], goal)
            assert obs["image"].dtype == np.uint8 and obs["image"].mean() > 40
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        with pytest.raises(ValueError, match="4 finite"):
            env.reset()
            env.step(np.zeros(3))
        # the seed given to reset fixes the goal; another seed moves it
        np.testing.assert_allclose(env.reset(seed=1)["state"][36:39], goal)
        assert not np.allclose(env.reset(seed=2)["state"][36:39], goal)
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


_NAME = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{32}-(\d+)\.npz$")


def _load_all(out: Path) -> dict[str, dict[str, np.ndarray]]:
    episodes = {}
    for path in sorted(out.rglob("*.npz")):
        m = _NAME.match(path.name)
        assert m, path.name
        with np.load(path, allow_pickle=False) as data:
            ep = {k: data[k] for k in data.files}
        assert int(m.group(1)) == len(ep["image"]) - 1
        episodes[path.parent.name] = ep
    return episodes


@pytest.mark.slow
def test_generate_tiny_run_loads_and_is_worker_independent(tmp_path: Path) -> None:
    kwargs = dict(
        tasks=["reach", "push-v3"], episodes_per_task=1, max_steps=60, noise_std=0.1, seed=3, cut_after_success=2
    )
    summary = generate.generate_videos(tmp_path / "w1", workers=1, verbose=False, **kwargs)
    assert summary["episodes"] == 2 and summary["tasks"] == ["reach", "push"]
    assert summary["fps"] > 0 and len(summary["files"]) == 2
    episodes = _load_all(tmp_path / "w1")
    assert set(episodes) == {"reach", "push"}
    for task, ep in episodes.items():
        n = len(ep["image"])
        assert set(ep) == {"image", "action", "reward", "success", "is_first", "is_last", "is_terminal", "hand"}
        assert ep["image"].shape == (n, 64, 64, 3) and ep["image"].dtype == np.uint8
        assert ep["image"].mean() > 40
        assert ep["action"].shape == (n, 4) and ep["action"].dtype == np.float32
        assert np.all(ep["action"][0] == 0) and np.abs(ep["action"]).max() <= 1
        assert ep["reward"].dtype == np.float32 and ep["reward"][0] == 0
        assert ep["is_first"].tolist() == [True] + [False] * (n - 1)
        assert ep["is_last"].tolist() == [False] * (n - 1) + [True]
        assert not ep["is_terminal"].any()
        # The hand's measured position: it moves the way the (x, y, z) actions push it.
        assert ep["hand"].shape == (n, 3) and ep["hand"].dtype == np.float32
        moved, pushed = np.diff(ep["hand"], axis=0), ep["action"][1:, :3]
        assert np.abs(moved).max() > 1e-3
        assert all(np.corrcoef(moved[:, d], pushed[:, d])[0, 1] > 0.3 for d in range(3) if pushed[:, d].std() > 0.1)
        hits = np.flatnonzero(ep["success"])
        if hits.size:  # cut 2 steps after the first success
            assert n - 1 == hits[0] + 2
        else:
            assert n - 1 == 60
        assert summary["per_task"][task]["frames"] == n
    assert summary["per_task"]["reach"]["successes"] == 1  # the reach expert succeeds in about 45 steps

    ds = NpzEpisodeDataset(tmp_path / "w1", min_length=10)
    batch = ds.sample(np.random.default_rng(0), 4, 10)
    assert batch["image"].shape == (4, 10, 64, 64, 3)

    # Two worker processes (forkserver) write the same episodes: content depends on (seed, task, episode),
    # and so do the names, so that readers which sort them see one order on every run.
    generate.generate_videos(tmp_path / "w2", workers=2, verbose=False, **kwargs)
    again = _load_all(tmp_path / "w2")
    names = [sorted(str(p.relative_to(tmp_path / w)) for p in (tmp_path / w).rglob("*.npz")) for w in ("w1", "w2")]
    assert names[0] == names[1]
    assert all(os.path.basename(n).startswith(f"00000000T000000-{3:016x}{0:016x}-") for n in names[0])
    for task in episodes:
        for key in episodes[task]:
            np.testing.assert_array_equal(episodes[task][key], again[task][key], err_msg=f"{task}/{key}")


def test_cli_rejects_unknown_task(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    try:
        import generate_videos as cli
    finally:
        sys.path.pop(0)
    with pytest.raises(mw.UnknownTaskError, match="Valid names"):
        cli.main(["--out", str(tmp_path), "--tasks", "no-such-task"])
    with pytest.raises(ValueError, match="No tasks"):
        cli.main(["--out", str(tmp_path), "--tasks", "reach", "--exclude", "reach-v3"])


def test_synthetic_square_videos_have_the_same_names_and_order_on_every_run(tmp_path):
    """Random (time + uuid) names made the item order, and so the learning tests' training data
    order, differ between runs; the synthetic writer names files by episode index."""
    from prelar_jax.data import synthetic

    names = []
    for run in ("a", "b"):
        synthetic.write_moving_square_videos(tmp_path / run, 3, 8, seed=0)
        names.append(sorted(p.name for p in (tmp_path / run / "square").glob("*.npz")))
    assert names[0] == names[1] == [f"00000000T000000-{i:032x}-8.npz" for i in range(3)]
