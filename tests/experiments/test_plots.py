"""The plots share one matplotlib set-up (Agg, atomic PNG saving, figures closed): each file is a
PNG of its figure size times its resolution, and no figure stays open."""

from __future__ import annotations

import struct

import pytest

from deltatune.experiments import plots
from deltatune.train.callbacks import plot_losses


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16-24, big-endian)."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def test_plots_are_pngs_at_their_resolution_and_leave_no_figure_open(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    points = [{"d": 10, "value": 0.6}, {"d": 100, "value": 0.85}]
    written = plots.intrinsic_plot(points, 0.9, "accuracy", 100, tmp_path / "intrinsic.png")
    assert png_size(written["plot"]) == (7 * 120, 4.5 * 120)  # figsize (7, 4.5) inches at 120 dpi
    written = plots.heatmap([[1.0, 0.5], [0.5, 1.0]], tmp_path / "phi.png", "phi", "j", "i")
    assert png_size(written["heatmap"]) == (5.5 * 120, 4.5 * 120)
    records = [{"kind": "train", "step": 1, "loss": 0.7}, {"kind": "eval", "step": 1, "loss": 0.6, "accuracy": 0.5}]
    assert plot_losses(records, tmp_path / "loss.png")
    assert png_size(tmp_path / "loss.png") == (7 * 110, 4 * 110)  # the figure's own 110 dpi
    assert plt.get_fignums() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["intrinsic.png", "loss.png", "phi.png"]  # no temp files
