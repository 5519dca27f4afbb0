"""Meta-World v3 tasks with 64x64 pixel observations: the one place that builds them.

Why the raw task class and not `gym.make('Meta-World/MT1', ...)` (see
`/work/shared/reference/envs_data.md`, sections 1 and 3):
- MT1 re-freezes the goal to one of 50 pre-sampled goals at every reset. APV and PreLAR drew a fresh,
  continuous goal at every reset (`_freeze_rand_vec = False`); we do the same, drawn from the env's
  seeded generator (`seeded_rand_vec = True`) so a seed reproduces the goal sequence.
- Gymnasium's offscreen viewer never makes its own GL context current, so a second env in the same
  process (train + eval) renders from the wrong context or all black. A `mujoco.Renderer` per task
  makes its context current on every render.
- The model's default visual settings (4x MSAA, a 640x480 buffer, a 4096^2 shadow map) are the paper's
  look but make software rendering about 10x slower. `render=` takes a `RenderSettings`
  (`prelar_jax.envs.rendering`: presets `PAPER` and `LEAN`, whose frames differ by ~5/255 on average:
  the drop shadows and the anti-aliased edges). This class defaults to `LEAN` (tests, tools); the
  fine-tuning config's `paper` preset asks for `PAPER`.

`MUJOCO_GL` is read when `mujoco` is first imported, so this module sets a default of `egl` at import
and imports `mujoco` and `metaworld` lazily (that also lets `check_rendering_backend` fall back to
OSMesa when it runs before any MuJoCo import).
"""

from __future__ import annotations

import difflib
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import subprocess
import sys
from typing import Any

import numpy as np

from prelar_jax.envs.rendering import LEAN, RenderSettings, resolve_render_settings
from prelar_jax.errors import UserError

# All 50 Meta-World v3 tasks, without the `-v3` suffix (tests check this against metaworld.env_dict).
TASK_NAMES: tuple[str, ...] = (
    "assembly", "basketball", "bin-picking", "box-close", "button-press-topdown",
    "button-press-topdown-wall", "button-press", "button-press-wall", "coffee-button", "coffee-pull",
    "coffee-push", "dial-turn", "disassemble", "door-close", "door-lock", "door-open", "door-unlock",
    "drawer-close", "drawer-open", "faucet-close", "faucet-open", "hammer", "hand-insert",
    "handle-press-side", "handle-press", "handle-pull-side", "handle-pull", "lever-pull",
    "peg-insert-side", "peg-unplug-side", "pick-out-of-hole", "pick-place", "pick-place-wall",
    "plate-slide-back-side", "plate-slide-back", "plate-slide-side", "plate-slide", "push-back", "push",
    "push-wall", "reach", "reach-wall", "shelf-place", "soccer", "stick-pull", "stick-push",
    "sweep-into", "sweep", "window-close", "window-open",
)  # fmt: skip

# Fine-tuning benchmark tasks (the six of APV's results plus four more used by PreLAR). Pre-training
# videos exclude them by default so the pre-trained model has never seen the downstream task.
BENCHMARK_TASKS: tuple[str, ...] = (
    "drawer-open", "lever-pull", "door-lock", "button-press-topdown-wall", "reach", "dial-turn",
    "button-press", "window-open", "hammer", "door-open",
)  # fmt: skip

MAX_EPISODE_STEPS = 500  # SawyerXYZEnv.max_path_length; the env raises if stepped past it.

# Debian packages and the set-up script that provide each backend (named in the error message).
_BACKEND_PACKAGES = {"egl": "libegl1 libegl-mesa0 libgl1", "osmesa": "libosmesa6"}
_PROBE_SCRIPT = (
    "import mujoco\n"
    "ctx = mujoco.GLContext(16, 16)\n"
    "ctx.make_current()\n"
    "m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size=\"1\"/></worldbody></mujoco>')\n"
    "m.vis.global_.offwidth = m.vis.global_.offheight = 16\n"
    "r = mujoco.Renderer(m, 16, 16)\n"
    "d = mujoco.MjData(m)\n"
    "r.update_scene(d)\n"
    "r.render()\n"
    "r.close()\n"
    "ctx.free()\n"
)


class UnknownTaskError(UserError, ValueError):
    """A task name that is not one of the 50 Meta-World v3 tasks."""


class RenderingBackendError(UserError, RuntimeError):
    """No headless OpenGL backend (EGL or OSMesa) can render MuJoCo scenes here."""


def canonical_task_name(task: str) -> str:
    """'drawer-open', 'drawer-open-v3' and 'drawer_open' all give 'drawer-open'."""
    name = task.strip().lower().replace("_", "-")
    if name.endswith("-v3"):
        name = name[: -len("-v3")]
    if name not in TASK_NAMES:
        close = difflib.get_close_matches(name, TASK_NAMES, n=3, cutoff=0.6)
        hint = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownTaskError(
            f"Unknown Meta-World task {task!r}. {hint}Valid names (with or without the '-v3' suffix): "
            + ", ".join(TASK_NAMES)
        )
    return name


def _probe_backend(backend: str, timeout: float = 60.0) -> str | None:
    """Try to render one frame with `backend` in a fresh interpreter; None if it worked, else why not.

    A subprocess is used because the backend is fixed at `import mujoco`, and so that the caller never
    owns a GL context (which would make later `fork`-started workers hang).
    """
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


_CHECKED_BACKEND: str | None = None


def check_rendering_backend(candidates: tuple[str, ...] = ("egl", "osmesa")) -> str:
    """Return a MUJOCO_GL backend that renders offscreen here; raise RenderingBackendError if none does.

    If `mujoco` is not imported yet, the first working backend of `candidates` (an explicitly set
    MUJOCO_GL is tried first) is written to `os.environ['MUJOCO_GL']`, so the fallback to OSMesa works.
    If it is already imported, only the backend it was imported with can be used.
    """
    global _CHECKED_BACKEND
    current = os.environ.get("MUJOCO_GL", "").strip().lower()
    if _CHECKED_BACKEND is not None and _CHECKED_BACKEND == current:
        return current
    fixed = "mujoco" in sys.modules
    order = [current] if fixed else list(dict.fromkeys([current, *candidates]))
    failures: dict[str, str] = {}
    for backend in [b for b in order if b]:
        why = _probe_backend(backend)
        if why is None:
            os.environ["MUJOCO_GL"] = backend
            os.environ["PYOPENGL_PLATFORM"] = backend  # mujoco.{egl,osmesa} refuse a mismatched value
            _CHECKED_BACKEND = backend
            return backend
        failures[backend] = why
    hint = ""
    if fixed:
        others = [b for b in candidates if b != current and _probe_backend(b) is None]
        if others:
            hint = (
                f" Backend {others[0]!r} works: set MUJOCO_GL={others[0]} in the environment before "
                "Python starts (mujoco was already imported with the failing backend)."
            )
    raise RenderingBackendError(
        "MuJoCo cannot render offscreen: "
        + "; ".join(f"MUJOCO_GL={b}: {why}" for b, why in failures.items())
        + ". Install the Debian packages for EGL (`apt-get install "
        + _BACKEND_PACKAGES["egl"]
        + "`) or OSMesa (`apt-get install "
        + _BACKEND_PACKAGES["osmesa"]
        + "` and MUJOCO_GL=osmesa), or run experiments/setup_env.sh."
        + hint
    )


class MetaWorldTask:
    """One goal-observable Meta-World v3 task with `size`x`size` RGB frames, in Dreamer's dict form.

    `reset()` and `step(action)` return a dict:
      image       uint8 [size, size, 3]   camera frame in the APV/PreLAR orientation (see `render`)
      state       float64 [39]            the env observation, goal included
      reward      float                   0.0 on reset (Dreamer convention); with `action_repeat` k,
                                          the sum over the k control steps
      success     bool                    info['success'] of this step (of any of its k control
                                          steps); False on reset
      is_first    bool                    True only on reset
      is_last     bool                    True on the step that reaches `time_limit` control steps
                                          (500 by default)
      is_terminal bool                    always False (Meta-World never terminates)

    Goals and object positions are re-drawn at each reset from a generator seeded by `seed` (and by
    `reset(seed=...)` when given), as APV/PreLAR did with `_freeze_rand_vec = False`.

    action_repeat: each `step` applies its action for this many control steps (Dreamer's action
    repeat), rendering once at the end; an episode still ends after `time_limit` control steps, so
    its last step repeats fewer times when `action_repeat` does not divide `time_limit`.

    render: a `RenderSettings`, a spec such as 'paper' or 'lean+shadows', or a `{setting: bool}`
    mapping (default `LEAN`). `lean_rendering` is the older switch, still accepted: True = `LEAN`,
    False = `PAPER`.
    """

    def __init__(
        self,
        task: str,
        seed: int,
        size: int = 64,
        camera: str = "corner",
        render: RenderSettings | str | Any = None,
        time_limit: int = MAX_EPISODE_STEPS,
        *,
        lean_rendering: bool | None = None,
        action_repeat: int = 1,
    ) -> None:
        self.task = canonical_task_name(task)
        self.render_settings = resolve_render_settings(render, lean_rendering, default=LEAN)
        if not 1 <= time_limit <= MAX_EPISODE_STEPS:
            raise ValueError(f"time_limit must be in [1, {MAX_EPISODE_STEPS}] (Meta-World's horizon), got {time_limit}")
        if isinstance(action_repeat, bool) or int(action_repeat) != action_repeat or action_repeat < 1:
            raise ValueError(f"action_repeat must be a positive integer (1: no repeat), got {action_repeat!r}")
        self.action_repeat = int(action_repeat)
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.size = size
        self.camera = camera
        self.time_limit = time_limit
        env = ALL_V3_ENVIRONMENTS[f"{self.task}-v3"]()
        # Goal-observable: the scripted policies read the goal from the state. The cached observation
        # bounds were computed while partially observable (goal bounds [0, 0, 0]) and v3 clips every step
        # obs to them, so they must be recomputed or the goal turns to 0 after the first step.
        env._partially_observable = False
        del env.sawyer_observation_space
        env._freeze_rand_vec = False  # fresh goal at every reset, like APV/PreLAR
        env.seeded_rand_vec = True  # ... drawn from env.np_random, so seeds reproduce it
        env._set_task_called = True  # we never call set_task (it would freeze the goal)
        env.seed(int(seed))
        self._env = env

        model = env.model
        cameras = [model.camera(i).name for i in range(model.ncam)]
        if camera not in cameras:
            env.close()
            raise ValueError(f"Unknown camera {camera!r} for {self.task}; valid cameras: {', '.join(cameras)}")
        self.render_settings.apply_to_model(model, size)  # before the renderer creates its GL context
        try:
            self._renderer = mujoco.Renderer(model, size, size)
        except Exception as exc:  # missing EGL/OSMesa libraries surface here
            env.close()
            check_rendering_backend()  # raises the clear RenderingBackendError if no backend works
            raise RenderingBackendError(
                f"Could not create a MuJoCo renderer with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {exc}"
            ) from exc
        self.render_settings.apply_to_scene(self._renderer.scene)
        self._steps = 0
        self._needs_reset = True
        self._closed = False

    @property
    def env(self) -> Any:
        """The underlying raw `SawyerXYZEnv` (for state access; do not call its `render`)."""
        return self._env

    @property
    def steps(self) -> int:
        """Control steps taken since the last reset (`action_repeat` per `step` call)."""
        return self._steps

    def render(self) -> np.ndarray:
        """Current frame, uint8 [size, size, 3], rows flipped (`[::-1]`).

        APV and PreLAR rendered through mujoco-py, whose offscreen buffer comes back bottom row first;
        the `corner*` cameras are mounted upside down, so their frames looked upright (mirrored
        left-right). `mujoco.Renderer` returns rows top-down, which shows `corner` rotated by 180
        degrees; flipping the rows reproduces the mujoco-py frames, for every camera.
        """
        self._renderer.update_scene(self._env.data, camera=self.camera)
        return np.ascontiguousarray(self._renderer.render()[::-1])  # [size, size, 3] uint8

    def _obs(self, state: np.ndarray, reward: float, success: bool, is_first: bool, is_last: bool) -> dict:
        return {
            "image": self.render(),
            "state": np.asarray(state, dtype=np.float64),  # [39]
            "reward": float(reward),
            "success": bool(success),
            "is_first": is_first,
            "is_last": is_last,
            "is_terminal": False,
        }

    def reset(self, seed: int | None = None) -> dict:
        """Start an episode; `seed` (optional) re-seeds the goal generator first."""
        self._check_open()
        if seed is not None:
            self._env.seed(int(seed))
        state, _ = self._env.reset()
        self._steps = 0
        self._needs_reset = False
        return self._obs(state, 0.0, False, True, False)

    def step(self, action: np.ndarray) -> dict:
        """Apply a 4-d action in [-1, 1] (xyz hand delta, gripper effort) for `action_repeat`
        control steps (fewer where the episode reaches `time_limit`)."""
        self._check_open()
        if self._needs_reset:
            raise RuntimeError("Call reset() before step(): the episode has not started or has ended (is_last).")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 4 finite numbers, got shape {action.shape}: {action}")
        reward, success, is_last = 0.0, False, False
        for _ in range(self.action_repeat):
            state, step_reward, _, truncated, info = self._env.step(action)
            self._steps += 1
            reward += float(step_reward)
            success = success or info["success"] > 0
            is_last = bool(truncated) or self._steps >= self.time_limit
            if is_last:
                break
        self._needs_reset = is_last
        return self._obs(state, reward, success, False, is_last)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetaWorldTask({self.task!r}) was closed.")

    def close(self) -> None:
        """Free the GL context and the env; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._renderer.close()
        self._env.close()

    def __enter__(self) -> "MetaWorldTask":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
