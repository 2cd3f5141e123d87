"""Tests of voxreg.plot: figures, their content, saving and input checks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mimage  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from voxreg import plot  # noqa: E402
from voxreg.transforms import folding_fraction  # noqa: E402


def _titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def _square(size: int = 32) -> np.ndarray:
    image = np.zeros((size, size))
    image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return image


def _shift(shape=(16, 20), rows=0.0, cols=0.0) -> np.ndarray:
    disp = np.zeros((2, *shape))
    disp[0] = rows
    disp[1] = cols
    return disp


def _fold(size: int = 32) -> np.ndarray:
    """Rows reversed (d(row + disp0)/d row = -1) inside a band of columns: det = -1 there."""
    disp = np.zeros((2, size, size))
    band = (np.arange(size) >= 10) & (np.arange(size) < 20)
    disp[0] = -2.0 * np.arange(size)[:, None] * band[None, :]
    return disp


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before, "voxreg.plot left a pyplot figure open"


# ------------------------------------------------------------------------------------------ slices


def test_slices_axes_titles_and_colormaps():
    images = [_square(), torch.rand(1, 1, 20, 40), np.random.rand(8, 12, 12)]
    fig = plot.slices(images, titles=["a", "b", "c"], cmaps=["gray", "viridis", "magma"])
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    assert _titles(fig) == ["a", "b", "c"]
    assert [ax.images[0].get_cmap().name for ax in fig.axes] == ["gray", "viridis", "magma"]
    # tensor with leading singleton axes shown as its 2D image
    assert fig.axes[1].images[0].get_array().shape == (20, 40)


def test_slices_volume_takes_middle_or_given_slice():
    volume = np.random.rand(6, 7, 8)
    fig = plot.slices(volume)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), volume[3])
    fig = plot.slices(volume, axis=2, index=1)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), volume[:, :, 1])


def test_slices_colorbars_and_grid():
    images = [np.random.rand(10, 10) for _ in range(3)]
    assert len(plot.slices(images, do_colorbars=True).axes) == 6
    fig = plot.slices(images, grid=(2, 2), titles=["x", "y", "z"])
    assert len(fig.axes) == 3  # the unused cell is removed
    assert _titles(fig) == ["x", "y", "z"]
    assert len(plot.slices(images * 2, grid=True).axes) == 6


def test_slices_bad_input():
    with pytest.raises(ValueError, match="images"):
        plot.slices(np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="titles"):
        plot.slices([np.zeros((4, 4))] * 2, titles=["only one"])
    with pytest.raises(ValueError, match="cmaps"):
        plot.slices([np.zeros((4, 4))] * 2, cmaps=["gray"] * 3)
    with pytest.raises(ValueError, match="grid"):
        plot.slices([np.zeros((4, 4))] * 3, grid=(1, 2))


def test_save_writes_png_atomically(tmp_path):
    target = tmp_path / "new" / "folder" / "square.png"
    fig = plot.slices(_square(), titles=["square"], save=target)
    assert isinstance(fig, Figure)
    assert target.is_file() and target.stat().st_size > 0
    assert [p.name for p in target.parent.iterdir()] == ["square.png"]  # no temp file left
    pixels = mimage.imread(target)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    gray = pixels[..., :3].mean(-1)
    assert (gray < 0.05).mean() > 0.1  # the black background of the image
    assert (gray > 0.95).mean() > 0.1  # its white square (and the white page)


# ----------------------------------------------------------------------------------- volume_slices


def test_volume_slices_rows_and_middle_slices():
    volumes = [np.random.rand(6, 8, 10), torch.rand(1, 1, 6, 8, 10)]
    fig = plot.volume_slices(volumes, titles=["fixed", "moved"])
    assert len(fig.axes) == 6
    titles = _titles(fig)
    assert all(t.startswith("fixed") for t in titles[:3])
    assert all(t.startswith("moved") for t in titles[3:])
    arrays = [ax.images[0].get_array() for ax in fig.axes[:3]]
    np.testing.assert_allclose(arrays[0], volumes[0][3])
    np.testing.assert_allclose(arrays[1], volumes[0][:, 4])
    np.testing.assert_allclose(arrays[2], volumes[0][:, :, 5])
    fig = plot.volume_slices(volumes[0], indices=(0, None, 9), do_colorbars=True)
    assert len(fig.axes) == 4
    np.testing.assert_allclose(fig.axes[2].images[0].get_array(), volumes[0][:, :, 9])


def test_volume_slices_bad_input():
    with pytest.raises(ValueError, match="volumes"):
        plot.volume_slices(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="indices"):
        plot.volume_slices(np.zeros((4, 4, 4)), indices=(0, 9, 0))


# -------------------------------------------------------------------------------------------- flow


def _quiver(ax):
    quivers = [c for c in ax.collections if isinstance(c, matplotlib.quiver.Quiver)]
    assert len(quivers) == 1
    return quivers[0]


def _display_direction(ax, quiver) -> np.ndarray:
    """Direction (dx, dy) on screen of the first arrow, y pointing up on screen."""
    tail = np.array([quiver.X[0], quiver.Y[0]], dtype=float)
    tip = tail + np.array([quiver.U[0], quiver.V[0]], dtype=float)
    return ax.transData.transform(tip) - ax.transData.transform(tail)


def test_flow_arrows_follow_ij_convention():
    down = _shift(rows=3.0)   # channel 0: along rows, i.e. down in imshow
    right = _shift(cols=2.0)  # channel 1: along columns, i.e. right
    fig = plot.flow([down, torch.tensor(right)], titles=["down", "right"], stride=4)
    assert len(fig.axes) == 2 and _titles(fig) == ["down", "right"]
    q_down, q_right = _quiver(fig.axes[0]), _quiver(fig.axes[1])
    np.testing.assert_allclose(q_down.U, 0.0)
    np.testing.assert_allclose(q_down.V, 3.0)
    np.testing.assert_allclose(q_right.U, 2.0)
    np.testing.assert_allclose(q_right.V, 0.0)
    # arrows sit on voxel centres (x = column, y = row) every 4 voxels
    assert set(np.asarray(q_down.X)) == {0, 4, 8, 12, 16}
    assert set(np.asarray(q_down.Y)) == {0, 4, 8, 12}
    # and point that way on screen: imshow's frame has rows going down
    for ax in fig.axes:
        assert ax.yaxis_inverted() and not ax.xaxis_inverted()
    fig.canvas.draw()
    dx, dy = _display_direction(fig.axes[0], q_down)
    assert abs(dx) < 1e-6 and dy < 0  # screen y grows upwards: the arrow points down
    dx, dy = _display_direction(fig.axes[1], q_right)
    assert dx > 0 and abs(dy) < 1e-6
    assert q_down.angles == "xy" and q_down.scale_units == "xy"


def test_flow_batch_colour_and_auto_stride(tmp_path):
    batch = np.random.randn(3, 2, 64, 64)
    fig = plot.flow(torch.tensor(batch), scale=None, do_colorbars=True, save=tmp_path / "f.png")
    assert len(fig.axes) == 6
    quiver = _quiver(fig.axes[0])
    assert len(quiver.U) == 32 * 32  # auto stride 2 on 64 voxels
    magnitude = np.hypot(batch[0, 0, ::2, ::2], batch[0, 1, ::2, ::2]).ravel()
    np.testing.assert_allclose(quiver.get_array(), magnitude)
    assert mimage.imread(tmp_path / "f.png").shape[0] > 0


def test_flow_bad_input():
    with pytest.raises(ValueError, match="disps"):
        plot.flow(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="disps"):
        plot.flow(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="disps"):
        plot.flow(np.zeros((1, 3, 8, 8, 8)))
    with pytest.raises(ValueError, match="stride"):
        plot.flow(np.zeros((2, 8, 8)), stride=0)
    with pytest.raises(ValueError, match="background"):
        plot.flow(np.zeros((2, 8, 8)), background=np.zeros((4, 4)))


# -------------------------------------------------------------------------------------------- grid


def _grid_lines(ax):
    rows = [line for line in ax.lines if line.get_gid() == "grid-row"]
    cols = [line for line in ax.lines if line.get_gid() == "grid-col"]
    return rows, cols


def test_grid_zero_field_is_straight():
    fig = plot.grid(np.zeros((2, 16, 20)), spacing=4)
    rows, cols = _grid_lines(fig.axes[0])
    assert len(rows) == 4 and len(cols) == 5
    for r, line in zip(range(0, 16, 4), rows, strict=True):
        np.testing.assert_allclose(line.get_ydata(), r)
        np.testing.assert_allclose(line.get_xdata(), np.arange(20))
    for c, line in zip(range(0, 20, 4), cols, strict=True):
        np.testing.assert_allclose(line.get_xdata(), c)
        np.testing.assert_allclose(line.get_ydata(), np.arange(16))
    assert fig.axes[0].yaxis_inverted()


def test_grid_translation_shifts_lines():
    disp = torch.tensor(_shift(rows=2.0, cols=-3.0))[None]
    fig = plot.grid(disp, spacing=5, title="shift")
    rows, cols = _grid_lines(fig.axes[0])
    for r, line in zip(range(0, 16, 5), rows, strict=True):
        np.testing.assert_allclose(line.get_ydata(), r + 2.0)
        np.testing.assert_allclose(line.get_xdata(), np.arange(20) - 3.0)
    for c, line in zip(range(0, 20, 5), cols, strict=True):
        np.testing.assert_allclose(line.get_xdata(), c - 3.0)
        np.testing.assert_allclose(line.get_ydata(), np.arange(16) + 2.0)
    assert _titles(fig) == ["shift"]


def test_grid_into_given_axes_and_bad_input():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot.grid(np.zeros((2, 8, 8)), ax=ax, background=np.random.rand(8, 8)) is fig
    assert len(ax.images) == 1 and len(ax.lines) == 4
    with pytest.raises(ValueError, match="disp"):
        plot.grid(np.zeros((3, 8, 8, 8)))
    with pytest.raises(ValueError, match="disp"):
        plot.grid(np.zeros((2, 2, 8, 8)))
    with pytest.raises(ValueError, match="spacing"):
        plot.grid(np.zeros((2, 8, 8)), spacing=0)


# ---------------------------------------------------------------------------------------- jacobian


def _folds(ax) -> np.ndarray:
    (image,) = [im for im in ax.images if im.get_gid() == "folds"]
    data = image.get_array()
    return ~np.ma.getmaskarray(data)[..., 3]


def test_jacobian_identity_has_no_fold():
    fig = plot.jacobian(np.zeros((2, 16, 16)), title="identity")
    assert len(fig.axes) == 2  # the map and its colorbar
    assert fig.axes[0].get_title() == "identity: 0.00% folding"
    assert not _folds(fig.axes[0]).any()
    image = fig.axes[0].images[0]
    assert image.norm.vmin < 1.0 < image.norm.vmax
    assert image.norm.vmin + image.norm.vmax == pytest.approx(2.0)  # centred on 1


def test_jacobian_marks_fold(tmp_path):
    disp = _fold()
    expected = 100 * float(folding_fraction(torch.tensor(disp)[None]))
    assert expected > 0
    fig = plot.jacobian(disp, title="fold", save=tmp_path / "jac.png")
    assert fig.axes[0].get_title() == f"fold: {expected:.2f}% folding"
    marked = _folds(fig.axes[0])
    assert marked[:, 12:18].all() and not marked[:, :8].any()
    pixels = mimage.imread(tmp_path / "jac.png")[..., :3]
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.1) & (pixels[..., 2] < 0.1)
    assert red.sum() > 100


def test_jacobian_3d_and_batch():
    disp3 = np.zeros((3, 6, 8, 10))
    fig = plot.jacobian(torch.tensor(disp3), axis=1)
    assert fig.axes[0].images[0].get_array().shape == (6, 10)
    fig = plot.jacobian(np.stack([np.zeros((2, 8, 8)), _fold(8)]))
    assert len(fig.axes) == 4
    assert fig.axes[0].get_title().startswith("0.00%")
    assert not fig.axes[2].get_title().startswith("0.00%")
    with pytest.raises(ValueError, match="disp"):
        plot.jacobian(np.zeros((4, 8, 8)))


# ----------------------------------------------------------------------------------------- labels


def test_label_colormap_fixed_colours():
    cmap = plot.label_colormap(5)
    assert cmap.N == 5
    colours = np.asarray(cmap.colors)
    assert colours[0, 3] == 0.0  # background transparent
    assert (colours[1:, 3] == 1.0).all()
    bigger = np.asarray(plot.label_colormap(torch.tensor([[0, 9]])).colors)
    assert bigger.shape == (10, 4)
    np.testing.assert_allclose(bigger[:5], colours)  # label colours do not depend on n
    assert not np.allclose(np.asarray(plot.label_colormap(5, seed=1).colors)[1:], colours[1:])
    assert len({tuple(c) for c in colours[1:]}) == 4
    with pytest.raises(ValueError, match="labels_or_n"):
        plot.label_colormap(np.array([-1, 2]))
    with pytest.raises(ValueError, match="labels_or_n"):
        plot.label_colormap(0)


def test_overlay_colours_labels(tmp_path):
    image = np.full((40, 40), 0.5)
    labels = np.zeros((40, 40), dtype=np.int64)
    labels[5:20, 5:20] = 3
    fig = plot.overlay(image, torch.tensor(labels), alpha=0.6, title="seg", save=tmp_path / "o.png")
    assert len(fig.axes) == 1 and _titles(fig) == ["seg"]
    (layer,) = [im for im in fig.axes[0].images if im.get_gid() == "labels"]
    rgba = np.asarray(layer.get_array())
    colour = np.asarray(plot.label_colormap(4).colors)[3]
    np.testing.assert_allclose(rgba[10, 10, :3], colour[:3])
    assert rgba[10, 10, 3] == pytest.approx(0.6)
    assert rgba[30, 30, 3] == 0.0  # label 0 transparent
    pixels = mimage.imread(tmp_path / "o.png")[..., :3]
    spread = pixels.max(-1) - pixels.min(-1)
    assert (spread > 0.1).sum() > 100  # coloured (not gray) pixels where the label is


def test_overlay_3d_and_bad_input():
    volume = np.random.rand(6, 8, 8)
    labels = np.zeros((6, 8, 8))
    labels[3, 2:4, 2:4] = 2.0
    fig = plot.overlay(volume, labels)
    layer = [im for im in fig.axes[0].images if im.get_gid() == "labels"][0]
    assert np.asarray(layer.get_array())[2, 2, 3] > 0
    with pytest.raises(ValueError, match="labels"):
        plot.overlay(volume, labels[:, :4])
    with pytest.raises(ValueError, match="labels"):
        plot.overlay(volume, labels + 0.5)
    with pytest.raises(ValueError, match="alpha"):
        plot.overlay(volume, labels, alpha=2)


# ---------------------------------------------------------------------------------------- history


def test_history_from_csv(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss,sim,time\n1,1.0,0.9,a\n2,0.5,0.4,b\n3,0.25,,c\n")
    fig = plot.history(path, log=True, title="training")
    ax = fig.axes[0]
    assert len(fig.axes) == 1
    assert [line.get_label() for line in ax.lines] == ["loss", "sim"]  # text column dropped
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.0, 0.5, 0.25])
    assert np.isnan(ax.lines[1].get_ydata()[2])
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "epoch"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "sim"]


def test_history_dict_and_records(tmp_path):
    fig = plot.history({"loss": [3, 2, 1], "reg": torch.tensor([0.1, 0.2, 0.3])})
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["loss", "reg"]
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [0, 1, 2])
    records = [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5, "dice": 0.7}]
    fig = plot.history(records, keys=["dice"], save=tmp_path / "h.png")
    (line,) = fig.axes[0].lines
    assert line.get_label() == "dice"
    assert np.isnan(line.get_ydata()[0]) and line.get_ydata()[1] == 0.7
    assert mimage.imread(tmp_path / "h.png").size > 0


def test_history_bad_input(tmp_path):
    with pytest.raises(ValueError, match="history"):
        plot.history(42)
    with pytest.raises(ValueError, match="history"):
        plot.history(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="history"):
        plot.history({"loss": ["a", "b"]})
    with pytest.raises(ValueError, match="keys"):
        plot.history({"loss": [1, 2]}, keys=["nope"])
