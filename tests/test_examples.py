"""The examples run end to end and show what they claim."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib.image
import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_warp_annotations_points_stay_on_the_digit(tmp_path):
    example = load_example("warp_annotations")
    numbers = example.main(["--out", str(tmp_path), "--seed", "3"])
    picture = matplotlib.image.imread(tmp_path / "warp_annotations.png")
    assert picture.shape[0] > 300 and picture.std() > 0.05
    saved = json.loads((tmp_path / "warp_annotations.json").read_text())
    assert saved["moved_points"] == numbers["moved_points"]
    before = np.array(numbers["intensity_at_points"])
    after = np.array(numbers["intensity_at_moved_points"])
    inside = np.array(numbers["points_inside_image"])
    assert before.min() > 0.5  # annotations were placed on the strokes
    # each annotation that stays in view still sits on the stroke it marked
    assert inside.sum() >= 3 and (after[inside] > 0.25).all()
    # and they did move: the affine is not the identity
    assert np.abs(np.array(numbers["moved_points"]) - np.array(numbers["points"])).max() > 1


def test_warp_annotations_without_mnist_uses_a_generated_digit(tmp_path, monkeypatch):
    example = load_example("warp_annotations")
    monkeypatch.setattr(example, "load_digit",
                        lambda rng, data: (example.generated_digit(rng), "generated"))
    numbers = example.main(["--out", str(tmp_path), "--seed", "1"])
    assert numbers["source"] == "generated"
    assert (tmp_path / "warp_annotations.png").stat().st_size > 5000


def test_multicontrast_pairs_invert_the_moving_slice_only():
    import numpy as np
    import torch

    from voxreg.data import ScanToScanDataset

    module = load_example("multicontrast2d")
    slices = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    slices[:, :2] = 0  # background
    pairs = module.InvertedMoving(ScanToScanDataset(slices, seed=0), p=0.5, seed=1)
    plain = ScanToScanDataset(slices, seed=0)
    flipped = 0
    for k in range(len(pairs)):
        a, b = pairs[k], plain[k]
        torch.testing.assert_close(a["fixed"], b["fixed"])
        if not torch.equal(a["moving"], b["moving"]):
            flipped += 1
            torch.testing.assert_close(a["moving"], torch.where(b["moving"] > 0, 1 - b["moving"],
                                                                torch.zeros_like(b["moving"])))
        assert torch.equal(pairs[k]["moving"], a["moving"])  # the same pair every time
    assert 0 < flipped < len(pairs)
