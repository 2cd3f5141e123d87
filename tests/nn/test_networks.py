"""Tests of voxreg.nn.networks: shapes, odd sizes, integration, bidir, config round trip, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from voxreg import transforms as T
from voxreg.checkpoint import list_models, load_model, read_checkpoint
from voxreg.nn import fused, networks
from voxreg.nn.networks import Transform, Unet, VxmDense
from voxreg.nn.registry import MODEL_CLASSES, build_model
from voxreg.nn.weights import inflate_weights

SMALL = [[8, 8, 8], [8, 8, 8, 8, 4]]  # 3 pooling levels, 2 final convs


def _pair(shape, batch=1, seed=0, channels=(1, 1)):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(batch, channels[0], *shape, generator=g),
        torch.rand(batch, channels[1], *shape, generator=g),
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_flow(model: VxmDense, std: float = 1.0) -> None:
    """Make the flow head produce a visible field (the default init is ~0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.flow.weight.normal_(0.0, std)
        model.flow.bias.normal_(0.0, std)


# ------------------------------------------------------------------------------------------
# Unet
# ------------------------------------------------------------------------------------------


def test_unet_shapes_2d_brief_example():
    net = Unet((32, 32), 2, [[32, 32, 32, 32], [32, 32, 32, 32, 32, 16]])
    assert net.input_shape == (None, 2, 32, 32)
    assert net.output_shape == (None, 16, 32, 32)
    assert net.final_nf == 16
    assert net.nb_levels == 5
    out = net(torch.rand(2, 2, 32, 32))
    assert out.shape == (2, 16, 32, 32)


def test_unet_default_features_3d():
    net = Unet((16, 16, 16), 2)
    assert net.final_nf == 16
    assert len(net.encoder) == 4 and len(net.decoder) == 4 and len(net.remaining) == 3
    assert net(torch.rand(1, 2, 16, 16, 16)).shape == (1, 16, 16, 16, 16)
    assert net.output_shape == (None, 16, 16, 16, 16)


def test_unet_decoder_longer_than_encoder_adds_full_res_convs():
    net = Unet((16, 16), 1, [[4, 8], [8, 4, 6, 5, 3]])
    assert len(net.remaining) == 3
    assert net.final_nf == 3
    assert net(torch.rand(1, 1, 16, 16)).shape == (1, 3, 16, 16)
    # the first extra conv reads the last decoder conv (4) + the first encoder level's skip (4)
    assert net.remaining[0].main.in_channels == 4 + 4
    assert net.decoder[0][0].main.in_channels == 8  # bottleneck: last encoder output


def test_unet_integer_features_and_half_res():
    net = Unet((16, 16), 2, nb_features=4, nb_levels=3, feat_mult=2, nb_conv_per_level=2)
    assert net.enc_nf == [4, 4, 8, 8] and net.dec_nf == [16, 16, 8, 8, 4, 4]
    assert net(torch.rand(1, 2, 16, 16)).shape == (1, 4, 16, 16)
    half = Unet((16, 16, 16), 2, SMALL, half_res=True)
    assert half.output_shape == (None, 4, 8, 8, 8)
    assert half(torch.rand(1, 2, 16, 16, 16)).shape == (1, 4, 8, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nb_features=[[8, 8], [8]]), "decoder"),
        (dict(nb_features=8), "nb_levels"),
        (dict(nb_levels=3), "nb_levels"),
        (dict(nb_features="abc"), "nb_features"),
        (dict(nb_features=[[8, 8, 8], [8, 8, 8]], nb_conv_per_level=2), "nb_conv_per_level"),
        (dict(infeats=0), "infeats"),
        (dict(inshape=(16,)), "inshape"),
    ],
)
def test_unet_bad_arguments(kwargs, match):
    args = dict(inshape=(16, 16), infeats=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Unet(**args)


# ------------------------------------------------------------------------------------------
# Unet implementation against a straightforward reference
# ------------------------------------------------------------------------------------------


def _reference_block(block, x):
    return F.leaky_relu(block.main(x), 0.2)


def _reference_unet(net: Unet, x: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's UNet written out plainly: conv + LeakyReLU, max-pool, nearest upsampling,
    concatenation (no fused decoder, standard layout)."""
    history = []
    for convs in net.encoder:
        for block in convs:
            x = _reference_block(block, x)
        history.append(x)
        x = F.max_pool2d(x, 2) if x.dim() == 4 else F.max_pool3d(x, 2)
    for level, convs in enumerate(net.decoder):
        for block in convs:
            x = _reference_block(block, x)
        if not net.half_res or level < net.nb_levels - 2:
            skip = history.pop()
            x = torch.cat([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], dim=1)
    for block in net.remaining:
        x = _reference_block(block, x)
    return x


def _outputs_and_grads(fn, module, inputs, seed=5):
    """fn(*inputs), and the gradients of a random linear function of it with respect to the
    inputs and the module's parameters."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = list(module.parameters())
    grads = torch.autograd.grad((out * weights).sum(), inputs + params)
    return out, grads


@pytest.fixture
def fuse_everything(monkeypatch):
    """Use the fused decoder step wherever it is exact (tiny test sizes are below the size
    thresholds), and count its calls."""
    monkeypatch.setattr(fused, "FUSE_MIN_VOXELS", 1)
    monkeypatch.setattr(fused, "ONEDNN_MIN_ELEMENTS", 0)
    calls = []
    original = fused.upsample_concat_conv

    def counted(block, coarse, skip):
        calls.append(tuple(coarse.shape))
        return original(block, coarse, skip)

    monkeypatch.setattr(fused, "upsample_concat_conv", counted)
    return calls


@pytest.mark.parametrize(
    "coarse_shape, skip_channels",
    [((2, 3, 5, 4), 2), ((1, 4, 1, 1), 3), ((1, 2, 3, 4, 2), 3), ((2, 3, 2, 2, 2), 1)],
)
def test_upsample_concat_conv_equals_upsample_cat_conv(coarse_shape, skip_channels):
    """conv(cat(upsample(coarse), skip)) == transposed conv of coarse + conv of skip: outputs and
    gradients (inputs, weight, bias), borders included, 2D and 3D, in float64."""
    ndim = len(coarse_shape) - 2
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(coarse_shape, generator=g, dtype=torch.float64)
    skip_shape = (coarse_shape[0], skip_channels, *(2 * s for s in coarse_shape[2:]))
    skip = torch.randn(skip_shape, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    block = networks.ConvBlock(ndim, coarse_shape[1] + skip_channels, 5).double()
    with torch.no_grad():
        block.main.bias.normal_()

    def reference(c, s):
        up = F.interpolate(c, size=s.shape[2:], mode="nearest")
        return _reference_block(block, torch.cat([up, s], dim=1))

    expected = _outputs_and_grads(reference, block, [coarse, skip])
    result = _outputs_and_grads(lambda c, s: fused.upsample_concat_conv(block, c, s), block,
                                [coarse, skip])
    torch.testing.assert_close(result[0], expected[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(result[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the result is far from what dropping the border terms would give
    assert expected[0].abs().max() > 0.1


def test_upsampled_kernel_is_the_sum_of_the_covered_taps():
    """The tap matrix by hand: per axis, transposed taps 0..3 are w2, w1+w2, w0+w1, w0."""
    rows, cols = torch.tensor([1.0, 10.0, 100.0]), torch.tensor([0.0, 1.0, 0.0])
    kernel = fused.upsampled_conv_kernel(torch.outer(rows, cols).view(1, 1, 3, 3))
    expected = torch.outer(torch.tensor([100.0, 110.0, 11.0, 1.0]), torch.tensor([0.0, 1, 1, 0]))
    torch.testing.assert_close(kernel, expected.view(1, 1, 4, 4))


UNET_CASES = [
    # inshape, infeats, nb_features, kwargs, number of fused decoder steps
    ((16, 16), 2, SMALL, {}, 3),
    ((16, 12), 2, [[4, 6, 5], [6, 5, 4, 3]], {}, 2),  # 2x1 -> 4x3 is not a plain x2
    ((16, 16), 2, [[4, 6], [6, 5]], {}, 1),  # the last concatenation is the UNet's output
    ((16, 16), 1, 4, dict(nb_levels=3, feat_mult=2, nb_conv_per_level=2), 2),
    ((16, 16), 2, SMALL, dict(half_res=True), 2),
    ((13, 11), 2, SMALL, {}, 0),  # odd sizes: the plain upsampling path everywhere
    ((8, 8, 8), 2, SMALL, {}, 3),
    ((8, 12, 8), 1, [[4, 4], [4, 4, 3]], {}, 2),
]


@pytest.mark.parametrize("inshape, infeats, features, kwargs, n_fused", UNET_CASES)
def test_unet_matches_reference_in_float64(inshape, infeats, features, kwargs, n_fused,
                                           fuse_everything):
    torch.manual_seed(0)
    net = Unet(inshape, infeats, features, **kwargs).double()
    x = torch.rand(2, infeats, *inshape, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    expected = _outputs_and_grads(lambda t: _reference_unet(net, t), net, [x])
    out = _outputs_and_grads(net, net, [x])
    torch.testing.assert_close(out[0], expected[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(out[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(fuse_everything) == n_fused


@pytest.mark.parametrize("fuse", [True, False])
def test_unet_matches_reference_in_float32(fuse, fuse_everything, monkeypatch):
    """The float32 CPU path (oneDNN, channels-last), fused or not, against the reference."""
    if not fuse:
        monkeypatch.setattr(fused, "FUSE_MIN_VOXELS", 10**9)
    torch.manual_seed(0)
    net = Unet((32, 32), 2, [[16] * 5, [16] * 6])
    x = torch.rand(4, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = _outputs_and_grads(lambda t: _reference_unet(net, t), net, [x])
    out = _outputs_and_grads(net, net, [x])
    scale = expected[0].detach().abs().max()
    torch.testing.assert_close(out[0], expected[0], rtol=1e-4, atol=1e-5 * float(scale))
    for a, b in zip(out[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert (len(fuse_everything) == 5) == fuse


def test_unet_keeps_channels_last_on_cpu():
    """Every conv block sees channels-last activations, also after a 1x1 bottleneck (which
    reads as either layout)."""
    net = Unet((32, 32), 2, [[8] * 5, [8] * 6])
    seen = []
    for module in net.modules():
        if isinstance(module, networks.ConvBlock):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    net(torch.rand(2, 2, 32, 32))
    assert len(seen) == 11  # batch 2 of 32x32 is below the size for the fused decoder step
    for x in seen:
        if x.shape[2:].numel() > 1:
            assert x.is_contiguous(memory_format=torch.channels_last), tuple(x.shape)


def _load_shipped(name: str) -> torch.nn.Module:
    config = json.loads(read_checkpoint(name)[0]["config"])
    assert config["class"] in MODEL_CLASSES  # template models hold a VxmDense too
    return load_model(name, device="cpu")


@pytest.mark.parametrize("name", list_models())
def test_shipped_models_unet_matches_reference(name, fuse_everything):
    """The shipped weights load (state_dict names unchanged) and give the reference UNet's
    features."""
    unets = [m for m in _load_shipped(name).modules() if isinstance(m, Unet)]
    assert unets
    for net in unets:
        spatial = (32, 32) if len(net.inshape) == 2 else (16, 16, 16)
        x = torch.rand(2, net.infeats, *spatial, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = _reference_unet(net, x)
            out = net(x)
        torch.testing.assert_close(out, expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))
    assert fuse_everything


# ------------------------------------------------------------------------------------------
# VxmDense shapes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
@pytest.mark.parametrize("int_steps, int_downsize", [(0, 2), (7, 1), (7, 2)])
@pytest.mark.parametrize("bidir", [False, True])
def test_vxmdense_output_shapes(shape, int_steps, int_downsize, bidir):
    model = VxmDense(shape, SMALL, int_steps=int_steps, int_downsize=int_downsize, bidir=bidir)
    moving, fixed = _pair(shape, batch=2)
    out = model(moving, fixed, return_velocity=True)
    assert len(out) == (4 if bidir else 3)
    moved, disp, velocity = out[0], out[-2], out[-1]
    ndim = len(shape)
    assert moved.shape == moving.shape
    assert disp.shape == (2, ndim, *shape)
    if bidir:
        assert out[1].shape == fixed.shape
    downsized = int_steps > 0 and int_downsize > 1
    expected = tuple(s // 2 for s in shape) if downsized else shape
    assert velocity.shape == (2, ndim, *expected)
    # without return_velocity the velocity is not appended
    assert len(model(moving, fixed)) == len(out) - 1


def test_vxmdense_multichannel_and_registration_mode():
    model = VxmDense((16, 16), SMALL, bidir=True, src_feats=2, trg_feats=3)
    moving, fixed = _pair((16, 16), channels=(2, 3))
    moved, moved_fixed, disp = model(moving, fixed)
    assert moved.shape == (1, 2, 16, 16) and moved_fixed.shape == (1, 3, 16, 16)
    reg = model(moving, fixed, registration=True)
    assert len(reg) == 2
    torch.testing.assert_close(reg[1], disp)


@pytest.mark.parametrize("shape", [(29, 31), (7, 9, 5)])
@pytest.mark.parametrize("int_steps", [0, 7])
def test_vxmdense_odd_sizes(shape, int_steps):
    model = VxmDense(shape, SMALL, int_steps=int_steps, bidir=True)
    moving, fixed = _pair(shape)
    moved, moved_fixed, disp = model(moving, fixed)
    assert moved.shape == moving.shape
    assert moved_fixed.shape == fixed.shape
    assert disp.shape == (1, len(shape), *shape)


def test_odd_size_field_is_aligned_with_the_image():
    """The field for an odd size is the field of the zero-padded pair, cropped at the same place
    (so it sits on the image, not shifted by the padding)."""
    model = VxmDense((13, 11), SMALL, int_steps=0)
    _randomise_flow(model)
    moving, fixed = _pair((13, 11))
    padded = [torch.nn.functional.pad(x, (0, 5, 0, 3)) for x in (moving, fixed)]
    _, disp = model(moving, fixed)
    _, disp_padded = model(*padded)
    assert disp_padded.shape[2:] == (16, 16)
    torch.testing.assert_close(disp, disp_padded[..., :13, :11])


def test_vxmdense_default_features_odd_2d_and_other_size():
    model = VxmDense((29, 31))  # default features: padded to 32 x 32 inside
    moving, fixed = _pair((29, 31))
    moved, disp = model(moving, fixed)
    assert moved.shape == (1, 1, 29, 31) and disp.shape == (1, 2, 29, 31)
    # a size other than inshape (same rank) goes through the functional core
    moving, fixed = _pair((20, 18))
    moved, disp = model(moving, fixed)
    assert moved.shape == (1, 1, 20, 18) and disp.shape == (1, 2, 20, 18)


def test_vxmdense_other_size_matches_functional_core():
    model = VxmDense((16, 16), SMALL)
    _randomise_flow(model)
    moving, fixed = _pair((16, 16))
    ref = model(moving, fixed, return_velocity=True)
    other = VxmDense((24, 24), SMALL)
    other.load_state_dict(model.state_dict())
    out = other(moving, fixed, return_velocity=True)
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_vxmdense_half_res():
    model = VxmDense((17, 16), SMALL, unet_half_res=True, bidir=True)
    moving, fixed = _pair((17, 16))
    moved, moved_fixed, disp, velocity = model(moving, fixed, return_velocity=True)
    assert moved.shape == moving.shape and disp.shape == (1, 2, 17, 16)
    assert velocity.shape == (1, 2, 9, 8)
    with pytest.raises(ValueError, match="int_downsize"):
        VxmDense((16, 16), SMALL, unet_half_res=True, int_downsize=1)


# ------------------------------------------------------------------------------------------
# VxmDense behaviour
# ------------------------------------------------------------------------------------------


def test_initial_field_is_near_zero():
    model = VxmDense((16, 16), SMALL)
    moving, fixed = _pair((16, 16))
    moved, disp = model(moving, fixed)
    assert disp.abs().max() < 1e-2
    torch.testing.assert_close(moved, moving, atol=1e-2, rtol=0)


@pytest.mark.parametrize("shape", [(16, 16), (15, 17), (8, 8, 8)])
def test_disp_is_integrated_velocity(shape):
    model = VxmDense(shape, SMALL, int_steps=5, int_downsize=2)
    _randomise_flow(model)
    moving, fixed = _pair(shape)
    moved, disp, velocity = model(moving, fixed, return_velocity=True)
    assert velocity.abs().max() > 0.1  # a field that makes the check meaningful
    expected = T.resize_disp(T.integrate_velocity(velocity, 5), shape=shape)
    torch.testing.assert_close(disp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved, T.warp(moving, disp), atol=1e-5, rtol=1e-5)
    # scaling and squaring differs from the velocity itself
    assert not torch.allclose(disp, T.resize_disp(velocity, shape=shape), atol=1e-4)


def test_int_steps_zero_is_plain_displacement():
    model = VxmDense((16, 16), SMALL, int_steps=0, bidir=True)
    _randomise_flow(model)
    moving, fixed = _pair((16, 16))
    moved, moved_fixed, disp, velocity = model(moving, fixed, return_velocity=True)
    torch.testing.assert_close(disp, velocity)
    torch.testing.assert_close(moved_fixed, T.warp(fixed, -disp), atol=1e-5, rtol=1e-5)


def test_bidir_uses_inverse_field():
    model = VxmDense((16, 16), SMALL, int_steps=7, int_downsize=2, bidir=True)
    _randomise_flow(model)
    moving, fixed = _pair((16, 16))
    moved, moved_fixed, disp, velocity = model(moving, fixed, return_velocity=True)
    inverse = T.resize_disp(T.integrate_velocity(-velocity, 7), shape=(16, 16))
    torch.testing.assert_close(moved_fixed, T.warp(fixed, inverse), atol=1e-5, rtol=1e-5)
    # the two fields are inverse to each other (up to interpolation), not merely negated
    residual = T.compose(disp, inverse)
    assert residual.abs().max() < 0.1 * disp.abs().max()
    assert not torch.allclose(inverse, -disp, atol=1e-3)


def test_config_round_trip():
    model = VxmDense((12, 13), SMALL, int_steps=3, bidir=True, src_feats=2, trg_feats=1)
    _randomise_flow(model)
    config = json.loads(json.dumps(model.config))
    assert config["class"] == "VxmDense"
    rebuilt = build_model(config)
    assert isinstance(rebuilt, VxmDense)
    rebuilt.load_state_dict(model.state_dict())
    moving, fixed = _pair((12, 13), channels=(2, 1))
    for a, b in zip(model(moving, fixed), rebuilt(moving, fixed)):
        torch.testing.assert_close(a, b)

    unet = Unet((16, 16), 2, nb_features=4, nb_levels=3, feat_mult=2)
    rebuilt_unet = build_model(json.loads(json.dumps(unet.config)))
    rebuilt_unet.load_state_dict(unet.state_dict())
    x = torch.rand(1, 2, 16, 16)
    torch.testing.assert_close(unet(x), rebuilt_unet(x))

    transform = Transform((8, 8), interp="nearest", fill_value=1.0)
    assert build_model(json.loads(json.dumps(transform.config))).config == transform.config
    with pytest.raises(ValueError, match="class"):
        build_model({"class": "Nope"})


@pytest.mark.parametrize(
    "moving_shape, fixed_shape, match",
    [
        ((1, 1, 16, 16), (1, 1, 16, 15), "moving and fixed"),
        ((2, 1, 16, 16), (1, 1, 16, 16), "moving and fixed"),
        ((1, 2, 16, 16), (1, 1, 16, 16), "moving"),
        ((1, 1, 16, 16), (1, 3, 16, 16), "fixed"),
        ((1, 1, 16, 16, 16), (1, 1, 16, 16, 16), "moving"),
        ((1, 16, 16), (1, 16, 16), "moving"),
    ],
)
def test_vxmdense_bad_inputs(moving_shape, fixed_shape, match):
    model = VxmDense((16, 16), SMALL)
    with pytest.raises(ValueError, match=match):
        model(torch.rand(moving_shape), torch.rand(fixed_shape))


def test_vxmdense_rejects_nan_and_integer_inputs():
    model = VxmDense((16, 16), SMALL)
    moving, fixed = _pair((16, 16))
    bad = fixed.clone()
    bad[0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="fixed"):
        model(moving, bad)
    with pytest.raises(ValueError, match="moving"):
        model(torch.ones(1, 1, 16, 16, dtype=torch.int64), fixed)
    with pytest.raises(ValueError, match="int_steps"):
        VxmDense((16, 16), int_steps=-1)
    with pytest.raises(ValueError, match="int_downsize"):
        VxmDense((16, 16), int_downsize=0)


# ------------------------------------------------------------------------------------------
# Transform
# ------------------------------------------------------------------------------------------


def test_transform_matches_warp_and_handles_labels():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 10, 11, generator=g)
    disp = torch.randn(2, 2, 10, 11, generator=g)
    torch.testing.assert_close(Transform((10, 11))(image, disp), T.warp(image, disp))
    labels = torch.randint(0, 5, (2, 1, 10, 11), generator=g)
    moved = Transform((10, 11), interp="nearest")(labels, disp)
    assert moved.dtype == labels.dtype
    torch.testing.assert_close(moved, T.warp(labels, disp, interp="nearest"))
    # another size of the same rank goes through warp
    image, disp = image[..., :8, :9], disp[..., :8, :9]
    torch.testing.assert_close(Transform((10, 11))(image, disp), T.warp(image, disp))
    with pytest.raises(ValueError, match="disp"):
        Transform((10, 11))(image, torch.zeros(2, 3, 10, 11))


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def test_overfits_one_shifted_blob():
    torch.manual_seed(0)
    ij = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"))
    def blob(ci, cj):
        return torch.exp(-((ij[0] - ci) ** 2 + (ij[1] - cj) ** 2) / (2 * 2.0**2))[None, None]

    moving, fixed = blob(7.0, 7.0), blob(9.0, 8.0)
    model = VxmDense((16, 16), [[16, 16, 16], [16, 16, 16, 16, 16]], int_steps=7, int_downsize=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = torch.mean((model(moving, fixed)[0] - fixed) ** 2).item()
    for _ in range(100):
        moved, _disp = model(moving, fixed)
        loss = torch.mean((moved - fixed) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = torch.mean((model(moving, fixed)[0] - fixed) ** 2).item()
    assert end < 0.5 * start, (start, end)


def test_inflate_weights_reproduces_the_2d_network_on_every_slice():
    torch.manual_seed(0)
    features = [[8, 8], [8, 8, 8]]
    flat = VxmDense((32, 32), nb_features=features, int_steps=3, int_downsize=2)
    with torch.no_grad():  # a visible field
        flat.flow.weight.normal_(0.0, 0.1)
        flat.flow.bias.copy_(torch.tensor([0.3, -0.2]))
    deep = VxmDense((24, 32, 32), nb_features=features, int_steps=3, int_downsize=2)
    assert inflate_weights(deep, flat) == len(flat.state_dict())
    moving, fixed = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        _, disp2 = flat(moving, fixed, registration=True)
        _, disp3 = deep(moving[:, :, None].expand(-1, -1, 24, -1, -1).contiguous(),
                        fixed[:, :, None].expand(-1, -1, 24, -1, -1).contiguous(),
                        registration=True)
    assert disp2.abs().max() > 0.1
    # away from the first and last slices (zero padding there), every slice is the 2D field
    for depth in (10, 12, 14):
        torch.testing.assert_close(disp3[0, 1:, depth], disp2[0], atol=1e-4, rtol=0)
    assert disp3[0, 0].abs().max() < 1e-3  # no field along the new axis yet
    other = VxmDense((32, 32), nb_features=[[4, 8], [8, 8, 8]])
    with pytest.raises(ValueError, match="inflate"):
        inflate_weights(deep, other)
