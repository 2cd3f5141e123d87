"""Checkpoints: exact save/load, optimizer round trip, clear errors, shipped-model lookup."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from voxreg import checkpoint as ck
from voxreg.checkpoint import CheckpointError, load_checkpoint, load_model, save_model
from voxreg.nn.networks import VxmDense

SHAPE = (16, 16)


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = VxmDense(SHAPE, nb_features=[[4, 4], [4, 4, 4]], int_steps=3, **kwargs)
    with torch.no_grad():  # a non-trivial flow head so that outputs depend on every weight
        model.flow.weight.normal_(0, 0.05)
    return model


def _pair(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, *SHAPE, generator=g), torch.rand(2, 1, *SHAPE, generator=g)


def _trained(model, steps=3):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    moving, fixed = _pair()
    for _ in range(steps):
        moved, disp = model(moving, fixed)
        loss = ((moved - fixed) ** 2).mean() + disp.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_save_load_identical_outputs(tmp_path):
    model = _model()
    path = save_model(model, tmp_path / "sub" / "m.safetensors", metadata={"data": "blobs"})
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["m.safetensors"]
    loaded = load_model(path, device="cpu")
    assert not loaded.training and loaded.config == model.config
    assert loaded.metadata == {"data": "blobs"}
    moving, fixed = _pair()
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(moving, fixed), loaded(moving, fixed)):
            assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert save_model(model, tmp_path / "noext").name == "noext.safetensors"


def test_file_is_plain_safetensors_with_json_header(tmp_path):
    path = save_model(_model(bidir=True), tmp_path / "m.safetensors", step=7, epoch=2,
                      history=[{"epoch": 1, "loss": 0.5}])
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8:8 + n])["__metadata__"]
    assert meta["format"] == "voxreg" and json.loads(meta["config"])["bidir"] is True
    ckpt = load_checkpoint(path)
    assert (ckpt.step, ckpt.epoch, ckpt.history) == (7, 2, [{"epoch": 1, "loss": 0.5}])
    assert ckpt.optimizer_state is None


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = _model()
    opt = _trained(model)
    path = save_model(model, tmp_path / "c.safetensors", optimizer=opt, step=3, epoch=1)
    ckpt = load_checkpoint(path)
    original, restored = opt.state_dict(), ckpt.optimizer_state
    assert restored["param_groups"] == original["param_groups"]
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    assert restored["state"].keys() == original["state"].keys()
    for key, state in original["state"].items():
        assert state.keys() == restored["state"][key].keys()
        for name, value in state.items():
            other = restored["state"][key][name]
            assert type(other) is type(value)
            assert torch.equal(other, value) and other.dtype == value.dtype
    # and it drives an optimizer to the same next step
    opt2 = torch.optim.Adam(ckpt.model.parameters(), lr=1e-3)
    opt2.load_state_dict(restored)
    _step_once(model, opt)
    _step_once(ckpt.model, opt2)
    for a, b in zip(model.parameters(), ckpt.model.parameters()):
        assert torch.equal(a, b)


def _step_once(model, opt):
    moving, fixed = _pair(5)
    model.train()
    moved, _ = model(moving, fixed)
    loss = ((moved - fixed) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_truncated_and_corrupt_files(tmp_path):
    path = save_model(_model(), tmp_path / "m.safetensors", optimizer=_trained(_model()))
    blob = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(truncated)
    cut_header = tmp_path / "cut.safetensors"
    cut_header.write_bytes(blob[:50])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(cut_header)
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(corrupt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(garbage)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError):
        load_model(tiny)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a voxreg checkpoint"):
        load_model(path)


def test_missing_file_and_shipped_models(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "MODELS_DIR", tmp_path / "models")
    with pytest.raises(FileNotFoundError, match="Shipped models: none"):
        load_model("mnist")
    save_model(_model(), tmp_path / "models" / "mnist.safetensors")
    save_model(_model(), tmp_path / "models" / "brain.safetensors")
    assert ck.list_models() == ["brain", "mnist"]
    assert load_model("mnist").config == _model().config
    with pytest.raises(FileNotFoundError) as info:
        load_model("oasis")
    assert "'oasis'" in str(info.value) and "'brain', 'mnist'" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_model(tmp_path / "nothere.safetensors")


def test_load_into_given_model_and_errors(tmp_path):
    model = _model()
    path = save_model(model, tmp_path / "m.safetensors")
    target = _model(seed=3)
    load_checkpoint(path, model=target)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), target.parameters()))
    with pytest.raises(ValueError, match="config"):
        load_checkpoint(path, model=_model(bidir=True))
    with pytest.raises(TypeError, match="config"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
