"""Images for people: open-loop prediction grids saved as PNG or GIF under ``<workdir>/media/``.

In the grid the error row is ``min(255, gain * |truth - model|)`` per channel, so a perfect
prediction is **black** and brighter pixels are larger errors.
"""

from __future__ import annotations

import os

import numpy as np

SEPARATOR_VALUE = 255  # White lines between frames and rows, so black error frames stay readable.


def _check_videos(truth: np.ndarray, model: np.ndarray) -> None:
    for name, video in (("truth", truth), ("model", model)):
        if video.ndim != 5 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(
                f"{name} must be a uint8 array [N, T, H, W, 3], got {video.dtype} {video.shape}; "
                "convert float images with np.clip(x * 255, 0, 255).astype(np.uint8) first."
            )
    if truth.shape != model.shape:
        raise ValueError(f"truth {truth.shape} and model {model.shape} must have the same shape.")


def error_frames(truth: np.ndarray, model: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """``|truth - model|`` amplified by ``gain`` and clipped: black where the prediction is exact."""
    difference = np.abs(truth.astype(np.int16) - model.astype(np.int16)).astype(np.float32)
    return np.clip(difference * gain, 0, 255).astype(np.uint8)


def prediction_grid(
    truth: np.ndarray, model: np.ndarray, gain: float = 4.0, separator: int = 1, group_separator: int = 3
) -> np.ndarray:
    """Stacks, for each of N sequences, three rows (truth, model, error) of T frames each.

    truth, model: [N, T, H, W, 3] uint8. Frames and rows are ``separator`` pixels apart and
    sequences ``group_separator``, so the result is uint8
    [3*N*H + 2*N*separator + (N-1)*group_separator, T*W + (T-1)*separator, 3].
    """
    truth, model = np.asarray(truth), np.asarray(model)
    _check_videos(truth, model)
    num_sequences, num_frames, height, width, _ = truth.shape
    error = error_frames(truth, model, gain)
    rows = []
    for index in range(num_sequences):
        for row_video in (truth[index], model[index], error[index]):  # [T, H, W, 3]
            row = np.full((height, num_frames * width + (num_frames - 1) * separator, 3), SEPARATOR_VALUE, np.uint8)
            for frame in range(num_frames):
                left = frame * (width + separator)
                row[:, left : left + width] = row_video[frame]
            rows.append(row)
    grid_width = rows[0].shape[1]
    pieces = []
    for position, row in enumerate(rows):
        if position:
            gap = group_separator if position % 3 == 0 else separator
            pieces.append(np.full((gap, grid_width, 3), SEPARATOR_VALUE, np.uint8))
        pieces.append(row)
    return np.concatenate(pieces, axis=0)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes an [H, W, 3] (or [H, W]) uint8 image, creating parent directories."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"save_png needs a uint8 [H, W, 3] or [H, W] image, got {image.dtype} {image.shape}.")
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    Image.fromarray(image).save(os.fspath(path), format="PNG")


def save_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = 10.0) -> None:
    """Writes [T, H, W, 3] uint8 frames as a looping GIF, creating parent directories."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"save_gif needs uint8 frames [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}.")
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(
        os.fspath(path), format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0
    )
