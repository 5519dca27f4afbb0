"""experiments/study_report.py: the table of several pre-training studies and their curves."""

import json

import numpy as np
from PIL import Image

from prelar_jax.runtime.config import config_module


def _study(directory, overrides, rows):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"overrides": overrides}))
    (directory / "study.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(directory)


def _row(step, r2, open_loop):
    return {
        "step": step,
        "probe_r2_mean": r2,
        "open_loop_mse": open_loop,
        "recon_mse": open_loop / 2,
        "mean_frame_mse": 0.006,
        "last_frame_mse": 0.004,
    }


def test_table_and_curves(tmp_path, capsys):
    report = config_module("experiments/study_report.py")
    a = _study(
        tmp_path / "A",
        {"data.root": "/x", "loss.code_forward_scale": 30.0},
        [dict(_row(0, -0.01, 0.03), probe_r2_random_encoder_mean=0.16), _row(500, 0.4, 0.005), _row(1000, 0.9, 0.003)],
    )
    b = _study(tmp_path / "B", {}, [_row(0, 0.02, 0.03), _row(500, -0.05, 0.002)])
    missing = str(tmp_path / "C")  # no study.jsonl: skipped with a note
    png = tmp_path / "curves.png"
    report.main(["--plot", str(png), a, b, missing])
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("| A") or line.startswith("| B")]
    assert len(lines) == 2
    assert "-0.01 → 0.90 | 0.16 |" in lines[0] and "loss.code_forward_scale=30.0" in lines[0]
    assert "data.root" not in lines[0]
    assert "0.02 → -0.05 | – |" in lines[1] and "(preset)" in lines[1]
    assert "skipped" in out.err
    image = Image.open(png)
    assert image.size[0] > 1000 and len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank
    assert "| – (–) |" in lines[0]  # no hand-motion probe in these studies

    # Studies whose probe videos have the hand's position: its column and a fourth panel.
    c = _study(
        tmp_path / "D",
        {},
        [
            dict(_row(0, 0.0, 0.03), probe_hand_r2_mean=0.0, probe_hand_r2_random_encoder_mean=0.1),
            dict(_row(500, 0.3, 0.004), probe_hand_r2_mean=0.7),
        ],
    )
    wide = tmp_path / "wide.png"
    report.main(["--plot", str(wide), a, c])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| D")]
    assert "| 0.70 (0.10) |" in line
    assert Image.open(wide).size[0] > image.size[0]
