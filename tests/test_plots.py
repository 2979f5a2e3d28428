"""How every report draws (minicpm/plots.py): log axes labelled as plain numbers at 1-2-5, PNGs at the figure's own
size and dpi, written whole or not at all."""

import math
import struct

import pytest

from minicpm.plots import figure, log_axis, png_bytes, save_png


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def tick_labels(fig, axis) -> list[str]:
    fig.canvas.draw()
    low, high = sorted(axis.get_view_interval())
    return [label.get_text() for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels())
            if low <= loc <= high]


def test_a_log_axis_is_labelled_with_plain_numbers_at_1_2_5():
    fig = figure(6, 3)
    ax = fig.subplots()
    ax.plot([0.002, 30.0], [1e-3, 4e2])
    log_axis(ax, "x")
    log_axis(ax, "y")
    for axis in (ax.xaxis, ax.yaxis):
        labels = tick_labels(fig, axis)
        assert len(labels) >= 6
        for label in labels:
            value = float(label)  # plain numbers: no "$10^{-3}$" mathtext, no "2×10^1"
            assert label == f"{value:g}"
            mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
            assert round(mantissa, 6) in (1.0, 2.0, 5.0), label
        assert all(label.get_text() == "" for label in axis.get_minorticklabels())
    assert ax.get_xscale() == ax.get_yscale() == "log"


def test_a_log_axis_with_given_ticks_labels_exactly_those_values():
    fig = figure(6, 3)
    ax = fig.subplots()
    batches = {256, 1024, 4096, 16384}
    ax.plot(sorted(batches), [4.0, 3.0, 2.5, 2.4])
    log_axis(ax, "x", ticks=batches)
    assert tick_labels(fig, ax.xaxis) == ["256", "1024", "4096", "16384"]


def test_a_figure_is_saved_at_its_own_size_and_dpi(tmp_path):
    fig = figure(5, 2, dpi=90)
    fig.subplots().plot([1, 2], [3, 4])
    assert png_size(png_bytes(fig)) == (450, 180)
    written = save_png(fig, tmp_path / "plots" / "a.png")
    assert written == tmp_path / "plots" / "a.png" and png_size(written.read_bytes()) == (450, 180)
    assert png_size(png_bytes(figure())) == (990, 572)  # the report panel: 9 x 5.2 inches at 110 dpi


def test_a_figure_that_fails_to_draw_leaves_the_old_png_whole(tmp_path):
    path = tmp_path / "a.png"
    good = figure(2, 2, dpi=50)
    good.subplots().plot([1, 2], [1, 2])
    old = save_png(good, path).read_bytes()
    broken = figure(2, 2, dpi=50)
    broken.subplots().set_title(r"$\undefinedcommand$")  # mathtext fails only when drawn
    with pytest.raises(ValueError):
        save_png(broken, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary left beside it
