"""MuJoCo rendering settings for Meta-World frames: the paper's look versus fast software rendering.

The Meta-World model's own visual settings (MuJoCo's defaults: a drop shadow from a 4096^2 shadow map,
reflections, 4x multisampling, a 640x480 offscreen buffer) are what APV and PreLAR rendered with, so
``PAPER`` reproduces the look of the original runs. In software OpenGL (llvmpipe, no GPU) they cost
about 10x: ``PAPER`` renders ~16 frames/s per core, ``LEAN`` ~160-190. A ``LEAN`` frame differs from a
``PAPER`` one by ~5/255 on average, about half from the missing drop shadows and half from the aliased
edges (no multisampling); reflections and the buffer size change almost nothing. Shadows are most of
the cost. Per-setting costs and frame differences: experiments/BENCHMARKS.md
(``experiments/env_throughput.py --render ... --look-frames N``).

This module imports neither MuJoCo nor Meta-World, so configs and validation can use it cheaply;
``apply_to_model`` / ``apply_to_scene`` take the MuJoCo objects from the caller.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from prelar_jax.errors import UserError


class RenderSettingsError(UserError, ValueError):
    """A rendering-settings spec or config block that names unknown settings or non-boolean values."""


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """Which of the model's costly visual effects to keep (True = as the model defines it = the paper).

    shadows:       the light's drop shadow (scene flag ``mjRND_SHADOW``; off also sets
                   ``model.vis.quality.shadowsize = 0`` so no shadow map is allocated).
    reflections:   reflective floor/table materials (scene flag ``mjRND_REFLECTION``).
    multisampling: anti-aliasing with the model's ``vis.quality.offsamples`` (4x MSAA); off sets it to 0.
    full_buffer:   render into the model's offscreen buffer (640x480) rather than one of the frame's
                   size; it only costs GPU/CPU memory (the frame is the same).
    """

    shadows: bool = True
    reflections: bool = True
    multisampling: bool = True
    full_buffer: bool = True

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, bool):
                raise RenderSettingsError(f"render setting {name!r} must be True or False, got {value!r}")

    def to_dict(self) -> dict[str, bool]:
        """``{setting: bool}``: the ``config.env.render`` block's form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "render settings") -> "RenderSettings":
        """From a ``{setting: bool}`` mapping (e.g. ``config.env.render``) naming every setting exactly once."""
        given = set(values.keys())
        if given != set(SETTING_NAMES):
            missing = [name for name in SETTING_NAMES if name not in given]
            unknown = sorted(str(name) for name in given - set(SETTING_NAMES))
            raise RenderSettingsError(
                f"{where}: needs exactly the keys {', '.join(SETTING_NAMES)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(unknown)}" if unknown else "")
            )
        bad = {k: v for k, v in values.items() if not isinstance(v, bool)}
        if bad:
            raise RenderSettingsError(
                f"{where}: settings must be True or False, got "
                + ", ".join(f"{k}={v!r}" for k, v in sorted(bad.items()))
            )
        return cls(**{k: values[k] for k in SETTING_NAMES})

    def describe(self) -> str:
        """The shortest spec that ``parse_render_settings`` maps back to these settings (e.g. 'lean+shadows')."""
        if self in PRESETS.values():
            return next(name for name, preset in PRESETS.items() if preset == self)
        on = [n for n in SETTING_NAMES if getattr(self, n)]
        off = [n for n in SETTING_NAMES if not getattr(self, n)]
        if len(on) <= len(off):
            return "lean" + "".join(f"+{n}" for n in on)
        return "paper" + "".join(f"-{n}" for n in off)

    def apply_to_model(self, model: Any, size: int) -> None:
        """Model-side settings; they must be set before the renderer creates its GL context."""
        if not self.multisampling:
            model.vis.quality.offsamples = 0
        if not self.shadows:
            model.vis.quality.shadowsize = 0
        if self.full_buffer:  # the model's buffer, grown if the frame is larger (the renderer needs it)
            model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
            model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        else:
            model.vis.global_.offwidth = size
            model.vis.global_.offheight = size

    def apply_to_scene(self, scene: Any) -> None:
        """Scene flags (``mujoco.Renderer.scene``); they can change at any time."""
        import mujoco

        scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = int(self.shadows)
        scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = int(self.reflections)


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RenderSettings))

# The look of the original runs: the model's own settings, untouched.
PAPER = RenderSettings(shadows=True, reflections=True, multisampling=True, full_buffer=True)
# ~10x faster in software GL; frames differ from PAPER by ~5/255 on average (no drop shadows, aliased edges).
LEAN = RenderSettings(shadows=False, reflections=False, multisampling=False, full_buffer=False)
PRESETS: dict[str, RenderSettings] = {"paper": PAPER, "lean": LEAN}


def parse_render_settings(spec: str) -> RenderSettings:
    """'paper', 'lean', or a preset with settings switched on/off: 'lean+shadows', 'paper-multisampling',
    'lean+shadows+reflections'. Used by the command-line tools' ``--render`` flag."""
    parts = re.split(r"([+-])", spec.strip().lower().replace(" ", ""))  # [base, sign, name, sign, name, ...]
    usage = (
        f"Valid: 'paper', 'lean', or either followed by +SETTING / -SETTING for SETTING in "
        f"{', '.join(SETTING_NAMES)} (e.g. 'lean+shadows', 'paper-multisampling')."
    )
    if parts[0] not in PRESETS:
        raise RenderSettingsError(f"unknown rendering preset {parts[0]!r} in {spec!r}. {usage}")
    values = PRESETS[parts[0]].to_dict()
    for sign, name in zip(parts[1::2], parts[2::2]):
        if name not in SETTING_NAMES:
            raise RenderSettingsError(f"unknown rendering setting {name!r} in {spec!r}. {usage}")
        values[name] = sign == "+"
    return RenderSettings(**values)


def resolve_render_settings(
    render: RenderSettings | str | Mapping[str, Any] | None, lean_rendering: bool | None, default: RenderSettings
) -> RenderSettings:
    """One ``RenderSettings`` from the accepted forms: a ``RenderSettings``, a spec string, a
    ``{setting: bool}`` mapping (a config block), or the older ``lean_rendering`` boolean
    (True = ``LEAN``, False = ``PAPER``); ``default`` when neither is given."""
    if render is not None and lean_rendering is not None:
        raise RenderSettingsError("pass either render= or the older lean_rendering=, not both")
    if lean_rendering is not None:
        if not isinstance(lean_rendering, bool):
            raise RenderSettingsError(f"lean_rendering must be True or False, got {lean_rendering!r}")
        return LEAN if lean_rendering else PAPER
    if render is None:
        return default
    if isinstance(render, RenderSettings):
        return render
    if isinstance(render, str):
        return parse_render_settings(render)
    if isinstance(render, Mapping) or hasattr(render, "keys"):
        return RenderSettings.from_mapping(dict(render))
    raise RenderSettingsError(f"render must be RenderSettings, a spec string or a mapping, got {render!r}")
