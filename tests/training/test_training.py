"""Training: loss falls, exact resume, history files, loss terms, data forms."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from voxreg.checkpoint import load_checkpoint, load_model
from voxreg.data import ScanToScanDataset, vxm_data_generator
from voxreg.nn.networks import VxmDense
from voxreg.training import Trainer, train

SHAPE = (16, 16)


def _blobs(n=8, seed=0, shape=SHAPE):
    """Gaussian blobs at random positions: a registration problem a tiny net learns fast."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centres = rng.uniform(5, 11, size=(n, 2))
    images = np.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2)
                    / (2 * 2.0**2))
    return images.astype(np.float32)


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return VxmDense(SHAPE, nb_features=[[8, 8], [8, 8, 8]], int_steps=3, **kwargs)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_loss_falls_and_files_written(tmp_path, capsys):
    ds = ScanToScanDataset(_blobs(16), pairs_per_epoch=32, seed=0)
    val = ScanToScanDataset(_blobs(8, seed=1), pairs_per_epoch=16, seed=1)
    val_batch = default_collate([val[i] for i in range(len(val))])

    def val_mse(model):
        moved, _ = model(val_batch["moving"], val_batch["fixed"])
        return float(((moved - val_batch["fixed"]) ** 2).mean())

    model = _model()
    with torch.no_grad():
        before = val_mse(model.eval())
    history = train(model, ds, losses=["mse", "grad"], loss_weights=[1.0, 0.01], epochs=20,
                    batch_size=8, lr=5e-3, device="cpu", out_dir=tmp_path, progress=False,
                    checkpoint_every=10, val_fn=val_mse)
    after = min(row["val"] for row in history[-3:])
    assert after < 0.75 * before, (before, [row["val"] for row in history])
    assert history[-1]["transformer_loss"] < history[0]["transformer_loss"]
    out = capsys.readouterr().out
    assert "epoch 20/20  loss: " in out and "transformer_loss: " in out and "flow_loss: " in out
    with open(tmp_path / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20 and {"epoch", "loss", "transformer_loss", "flow_loss", "val"} <= set(rows[0])
    assert float(rows[-1]["val"]) == pytest.approx(history[-1]["val"])
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.epoch == 20 and ckpt.step == 80 and len(ckpt.history) == 20
    assert ckpt.optimizer_state is not None
    final = load_model(tmp_path / "model.safetensors")
    assert not final.training
    assert all(torch.equal(a, b) for a, b in zip(final.parameters(), model.parameters()))


def test_resume_equals_uninterrupted_run(tmp_path):
    ds = ScanToScanDataset(_blobs(6), pairs_per_epoch=8, seed=2)
    kwargs = dict(losses=["mse", "grad"], loss_weights=[1.0, 0.05], batch_size=4, lr=1e-3,
                  device="cpu", seed=5, progress=False, verbose=False)
    straight = _model()
    history = train(straight, ds, epochs=4, out_dir=tmp_path / "a", **kwargs)

    first = _model()
    train(first, ds, epochs=2, out_dir=tmp_path / "b", **kwargs)
    resumed = _model(seed=99)  # different init: everything must come from the checkpoint
    history_b = train(resumed, ds, epochs=4, out_dir=tmp_path / "b", resume=True, **kwargs)

    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert len(history_b) == 4 and history_b[-1]["step"] == 8
    for row_a, row_b in zip(history, history_b):
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-4)


def test_time_budget_stops_between_epochs_and_resumes(tmp_path):
    ds = ScanToScanDataset(_blobs(6), pairs_per_epoch=8, seed=2)
    kwargs = dict(losses=["mse", "grad"], loss_weights=[1.0, 0.05], batch_size=4, lr=1e-3,
                  device="cpu", seed=5, progress=False, verbose=False)
    straight = _model()
    train(straight, ds, epochs=3, **kwargs)

    def slow_val(model):  # each epoch takes at least 0.4 s
        time.sleep(0.4)
        return 0.0

    budgeted = _model()
    history = train(budgeted, ds, epochs=3, out_dir=tmp_path, time_budget=0.6, val_fn=slow_val,
                    **kwargs)
    # after epoch 1 (>= 0.4 s), elapsed + slowest epoch > 0.6 s: no second epoch
    assert len(history) == 1
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").epoch == 1
    final = load_model(tmp_path / "model.safetensors")  # the run ends with its final model
    assert all(torch.equal(a, b) for a, b in zip(final.parameters(), budgeted.parameters()))
    resumed = _model(seed=99)
    history = train(resumed, ds, epochs=3, out_dir=tmp_path, resume=True, **kwargs)
    assert len(history) == 3
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for bad in (0, -1.0, "10", True):
        with pytest.raises(ValueError, match="time_budget"):
            train(_model(), ds, epochs=1, time_budget=bad, **kwargs)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    ds = ScanToScanDataset(_blobs(4), pairs_per_epoch=4, seed=0)
    history = train(_model(), ds, epochs=1, batch_size=4, device="cpu", out_dir=tmp_path,
                    resume=True, progress=False, verbose=False)
    assert len(history) == 1
    with pytest.raises(ValueError, match="out_dir"):
        train(_model(), ds, epochs=1, resume=True, progress=False)


def test_bidir_and_segmentation_terms():
    images = _blobs(4)
    segs = (images > 0.5).astype(np.uint8)
    ds = ScanToScanDataset(images, pairs_per_epoch=4, seed=0, segs=segs)
    model = _model(bidir=True)
    history = train(model, ds, epochs=1, batch_size=2, device="cpu", progress=False,
                    verbose=False)
    row = history[0]
    for key in ("transformer_loss", "neg_transformer_loss", "flow_loss", "seg_loss"):
        assert key in row and np.isfinite(row[key])
    assert -1.0 <= row["seg_loss"] <= 0.0  # negative Dice
    trainer = Trainer(model, ds, device="cpu", progress=False, verbose=False)
    assert trainer.weights == [0.5, 0.5, 0.01] and trainer.seg_weight == 0.01
    assert trainer.reg_on == "velocity" and trainer.seg_labels == [1]


def test_generator_data_and_val_fn():
    gen = vxm_data_generator(_blobs(6), batch_size=2, seed=0)
    calls = []
    history = train(_model(int_downsize=1), gen, losses=["ncc", "l2"], epochs=2,
                    steps_per_epoch=2, device="cpu", progress=False, verbose=False,
                    val_fn=lambda m: calls.append(m.training) or {"dice": 0.5}, reg_on="disp")
    assert [row["step"] for row in history] == [2, 4] and calls == [False, False]
    assert history[-1]["val_dice"] == 0.5
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train(_model(), vxm_data_generator(_blobs(2), 1), epochs=1, progress=False)


def test_bad_arguments():
    ds = ScanToScanDataset(_blobs(3), pairs_per_epoch=3)
    with pytest.raises(ValueError, match="losses"):
        Trainer(_model(), ds, losses=["mse"])
    with pytest.raises(ValueError, match="loss_weights"):
        Trainer(_model(), ds, losses=["mse", "grad"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="unknown loss"):
        Trainer(_model(), ds, losses=["mse", "smoothness"])
    with pytest.raises(ValueError, match="epochs"):
        Trainer(_model(), ds, epochs=0)
