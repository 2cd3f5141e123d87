"""The examples run end to end and show what they claim."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib.image
import numpy as np

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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


def test_synth3d_two_stages(tmp_path, one_thread):
    """pretrain2d writes a 2D model of the 3D architecture; train --inflate-from starts the 3D
    run from it (the 3D model's in-plane flow channels are the 2D head's)."""
    import pytest
    import torch

    from voxreg.checkpoint import load_checkpoint, load_model
    from voxreg.data.locate import shared_data

    synth3d = load_example("synth3d")
    flat = tmp_path / "flat"
    assert synth3d.main(["--run", str(flat), "pretrain2d", "--size", "32", "--epochs", "1",
                         "--steps-per-epoch", "2", "--batch-size", "2"]) == 0
    model2d = load_model(flat / "model.safetensors")
    assert model2d.flow.weight.shape == (2, 16, 3, 3)
    if shared_data("ixi") is None:
        pytest.skip("no ixi data for the 3D stage's validation")
    deep = tmp_path / "deep"
    assert synth3d.main(["--run", str(deep), "train", "--inflate-from",
                         str(flat / "model.safetensors"), "--crop", "16", "--epochs", "1",
                         "--steps-per-epoch", "1", "--lr", "1e-9"]) == 0
    ckpt = load_checkpoint(deep / "checkpoint.safetensors")
    assert ckpt.metadata["inflate_from"] == str(flat / "model.safetensors")
    head = ckpt.model.flow.weight.detach()
    expected = model2d.flow.weight.detach().unsqueeze(2).expand(-1, -1, 3, -1, -1) / 3
    torch.testing.assert_close(head[1:], expected, atol=1e-6, rtol=0)  # one step of lr 1e-9
    assert head[0].abs().max() < 1e-3
