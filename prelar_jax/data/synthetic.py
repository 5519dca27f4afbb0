"""Synthetic action-conditioned videos whose dynamics are known exactly: a square moved by actions.

A coloured square on a fixed textured background moves by ``speed * action`` pixels per step
(``action`` in [-1, 1]², a smooth random walk; the square stops at the borders). Everything a world
model must learn is in view and the true action is a linear function of the square's displacement,
so a model that learns anything beats the mean frame quickly and implicit actions that carry the
motion give a high probe R². The learning regression tests pre-train on these; the episodes are in
the DreamerV2 format the video loader reads (``image``, ``action``, ``reward``, ``is_first``, ...).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def background(size: int = 64, seed: int = 0) -> np.ndarray:
    """A fixed smooth colour texture ``[size, size, 3]`` uint8 (the same for every episode)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [
        96 + 40 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * x + rng.uniform(0.5, 1.5) * y + rng.uniform()))
        for _ in range(3)
    ]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def moving_square_episode(
    rng: np.random.Generator, length: int, size: int = 64, square: int = 10, speed: float = 4.0, smoothness: float = 0.7
) -> dict[str, np.ndarray]:
    """One episode of ``length + 1`` frames: ``image`` ``[L+1, size, size, 3]`` uint8, ``action``
    ``[L+1, 2]`` float32, where ``action[t]`` moved the square from ``image[t-1]`` to ``image[t]``
    (row 0 zeros, the Dreamer convention), and ``position`` ``[L+1, 2]``, the square's pixel
    position in each frame (what a code that leaks the second frame would carry)."""
    base = background(size)
    colour = np.array([230, 40, 40], np.uint8)
    pos = rng.uniform(0, size - square, size=2)
    action = np.zeros((length + 1, 2), np.float32)
    image = np.empty((length + 1, size, size, 3), np.uint8)
    position = np.empty((length + 1, 2), np.float32)  # the square's top-left corner (row, column)
    current = rng.uniform(-1, 1, size=2)
    for t in range(length + 1):
        if t > 0:
            current = np.clip(smoothness * current + (1 - smoothness) * rng.uniform(-1, 1, size=2) * 2.0, -1, 1)
            action[t] = current
            pos = np.clip(pos + speed * current, 0, size - square)
        frame = base.copy()
        r, c = int(round(pos[0])), int(round(pos[1]))
        frame[r : r + square, c : c + square] = colour
        image[t] = frame
        position[t] = (r, c)
    is_first = np.zeros(length + 1, bool)
    is_first[0] = True
    is_last = np.zeros(length + 1, bool)
    is_last[-1] = True
    return {
        "image": image,
        "action": action,
        "position": position,
        "reward": np.zeros(length + 1, np.float32),
        "is_first": is_first,
        "is_last": is_last,
        "is_terminal": np.zeros(length + 1, bool),
    }


def moving_square_episodes(count: int, length: int, seed: int = 0, **kwargs: Any) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [moving_square_episode(rng, length, **kwargs) for _ in range(count)]


def write_moving_square_videos(
    directory: str | os.PathLike, count: int, length: int, seed: int = 0, **kwargs: Any
) -> list[dict[str, np.ndarray]]:
    """Writes ``count`` episodes as ``<directory>/square/*.npz`` and returns them."""
    from prelar_jax.data.generate import save_episode

    episodes = moving_square_episodes(count, length, seed, **kwargs)
    for index, episode in enumerate(episodes):  # fixed names: the same item order on every run
        save_episode(os.path.join(os.fspath(directory), "square"), episode, index=index)
    return episodes
