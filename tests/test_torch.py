"""fastnorm.torch: autograd Functions (gradcheck in float64), drop-in modules (state_dict
compatibility, equality with the PyTorch layers they replace) and a tiny model that trains."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastnorm.torch")

import fastnorm  # noqa: E402

D = torch.float64


def _t(a, grad=False):
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(grad)


def _rois(rng, K, N, size, dtype=np.float64):
    """Boxes strictly inside a size x size map (fractional corners)."""
    xy = rng.uniform(0.3, size / 2, (K, 2))
    wh = rng.uniform(1.2, size / 2 - 0.3, (K, 2))
    return np.concatenate([rng.integers(0, N, (K, 1)), xy, xy + wh], 1).astype(dtype)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP wake-up costs on a loaded machine (thread-count
    independence of the kernels is tested in each op's own test file)."""
    with fastnorm.threads(1):
        yield


def _gradcheck(fn, *inputs, fast=True):
    """float64 gradcheck; ``fast`` compares random projections u^T J v of the analytical and the
    numerical Jacobian (torch's fast_mode), which needs far fewer calls than the full Jacobian."""
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


# ---------------------------------------------------------------- gradcheck of every Function

@pytest.mark.parametrize("activation", [None, "silu", "relu"])
def test_gradcheck_group_norm(rng, activation):
    x = _t(rng.standard_normal((2, 6, 3, 4)), True)
    w = _t(rng.standard_normal(6), True)
    b = _t(rng.standard_normal(6), True)
    _gradcheck(lambda x, w, b: ft.group_norm(x, 3, w, b, activation=activation), x, w, b,
               fast=False)
    _gradcheck(lambda x: ft.group_norm(x, 2), x)          # no affine parameters


@pytest.mark.parametrize("v2", [False, True])
def test_gradcheck_deform_conv2d(rng, v2):
    x = _t(rng.standard_normal((2, 4, 5, 5)), True)
    w = _t(rng.standard_normal((4, 2, 3, 3)), True)        # groups = 2
    b = _t(rng.standard_normal(4), True)
    off = _t(rng.uniform(-1.5, 1.5, (2, 18, 3, 3)), True)
    mask = _t(rng.random((2, 9, 3, 3)), True) if v2 else None
    if v2:
        _gradcheck(lambda x, o, m, w, b: ft.deform_conv2d(x, o, w, b, stride=(2, 2),
                                                          padding=(1, 1), mask=m),
                   x, off, mask, w, b)
    else:
        _gradcheck(lambda x, o, w, b: ft.deform_conv2d(x, o, w, b, stride=2, padding=1),
                   x, off, w, b)


@pytest.mark.parametrize("mode,aligned", [("avg", True), ("avg", False), ("max", True)])
def test_gradcheck_roi_align(rng, mode, aligned):
    x = _t(rng.standard_normal((2, 3, 8, 8)), True)
    rois = _t(_rois(rng, 4, 2, 8))
    _gradcheck(lambda x: ft.roi_align(x, rois, (2, 3), 1.0, 2, aligned, mode=mode), x)


def test_gradcheck_roi_pool(rng):
    x = _t(rng.standard_normal((2, 3, 8, 8)), True)
    rois = _t(_rois(rng, 4, 2, 8))
    _gradcheck(lambda x: ft.roi_pool(x, rois, 2, 1.0), x)


def test_gradcheck_ps_roi_align(rng):
    x = _t(rng.standard_normal((2, 8, 8, 8)), True)
    rois = _t(_rois(rng, 3, 2, 8))
    _gradcheck(lambda x: ft.ps_roi_align(x, rois, 2, 1.0, 2), x)


@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck_deform_roi_pool(rng, with_mask):
    x = _t(rng.standard_normal((2, 3, 10, 10)), True)
    rois = _t(_rois(rng, 3, 2, 8))
    off = _t(rng.uniform(-0.3, 0.3, (3, 2, 2, 2)), True)
    mask = _t(rng.random((3, 1, 2, 2)), True)
    if with_mask:
        _gradcheck(lambda x, o, m: ft.deform_roi_pool(x, rois, o, 2, 1.0, 2, 0.1, mask=m),
                   x, off, mask)
    else:
        _gradcheck(lambda x, o: ft.deform_roi_pool(x, rois, o, 2, 1.0, 2, 0.1), x, off)


def _rotated(rois):
    """(K, 5) [batch, x1, y1, x2, y2] RoIs as (K, 6) [batch, cx, cy, w, h, angle] with random
    angles (the same centres and sizes)."""
    xy, wh = (rois[:, 1:3] + rois[:, 3:5]) / 2, rois[:, 3:5] - rois[:, 1:3]
    angle = np.linspace(-170, 170, len(rois))[:, None]
    return np.concatenate([rois[:, :1], xy, wh, angle], 1).astype(rois.dtype)


@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck_roi_align_rotated(rng, aligned):
    x = _t(rng.standard_normal((2, 3, 8, 8)), True)
    rois = _t(_rotated(_rois(rng, 4, 2, 8)))
    _gradcheck(lambda x: ft.roi_align_rotated(x, rois, (2, 3), 1.0, 2, aligned), x)


@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck_multi_scale_roi_align(rng, aligned):
    """Every level's gradient (RoIs on three levels of a 16 x 24 image's pyramid)."""
    feats = [_t(rng.standard_normal((2, 2, 8 >> i, 12 >> i)), True) for i in range(3)]
    rois = _t(np.array([[0, 1, 1, 5, 6], [1, 2, 1, 12, 9], [0, 0, 0, 22, 16], [1, 3, 3, 4, 4]],
                       np.float64))
    kw = dict(spatial_scales=[0.5, 0.25, 0.125], canonical_scale=8, canonical_level=2,
              sampling_ratio=2, aligned=aligned)
    _gradcheck(lambda *f: ft.multi_scale_roi_align(list(f), rois, (2, 3), **kw), *feats,
               fast=False)


def test_gradcheck_modulated_deform_conv_module(rng):
    torch.manual_seed(0)
    m = ft.ModulatedDeformConv2d(4, 3, 3, padding=1, dtype=D)
    with torch.no_grad():                   # non-zero offsets/mask so every path is exercised
        m.conv_offset.weight.normal_(0, 0.1)
        m.conv_offset.bias.normal_(0, 0.3)
    x = _t(rng.standard_normal((1, 4, 5, 5)), True)
    _gradcheck(m, x)
    # parameters get gradients too, including the offset branch
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


# ---------------------------------------------------------------- forward agreement

def test_functions_match_fastnorm_and_torch(rng):
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    y = ft.group_norm(_t(x), 4, _t(w), _t(b))
    ref = torch.nn.functional.group_norm(_t(x), 4, _t(w), _t(b))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    ys = ft.group_norm(_t(x), 4, _t(w), _t(b), activation="silu")
    torch.testing.assert_close(ys, torch.nn.functional.silu(ref), rtol=1e-5, atol=1e-5)
    rois = _rois(rng, 5, 2, 6, np.float32)
    out = ft.roi_align(_t(x), _t(rois), 3, 0.5, 2, True)
    np.testing.assert_array_equal(out.numpy(), fastnorm.roi_align(x, rois, 3, 0.5, 2, True))
    # torchvision's list-of-boxes form is accepted and means the same RoIs
    order = np.argsort(rois[:, 0], kind="stable")
    per_image = [_t(rois[order][rois[order, 0] == i, 1:]) for i in range(2)]
    np.testing.assert_array_equal(ft.roi_align(_t(x), per_image, 3, 0.5, 2, True).numpy(),
                                  out.numpy()[order])


def test_grad_of_expanded_and_strided_grad_out(rng):
    """Incoming gradients with zero strides (from .sum()) or transposed layouts work."""
    x = _t(rng.standard_normal((2, 4, 3, 3)), True)
    ft.group_norm(x, 2).sum().backward()
    assert torch.allclose(x.grad, torch.zeros_like(x), atol=1e-12)   # sum of a normalised group
    x.grad = None
    y = ft.group_norm(x, 2)
    gy = torch.randn(2, 3, 3, 4, dtype=D).permute(0, 3, 1, 2)         # non-contiguous
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.group_norm(x2, 2).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)


# ---------------------------------------------------------------- modules: drop-in compatibility

def test_group_norm_state_dict_round_trip():
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = ft.GroupNorm(4, 16)
    assert isinstance(ours, torch.nn.GroupNorm)
    ours.load_state_dict(ref.state_dict())              # strict: same keys and shapes
    sd = ours.state_dict()
    assert list(sd) == list(ref.state_dict())
    assert all(sd[k].shape == v.shape for k, v in ref.state_dict().items())
    back = torch.nn.GroupNorm(4, 16)
    back.load_state_dict(sd)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    x = torch.randn(3, 16, 5, 7)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    # no affine: no parameters, like torch
    assert list(ft.GroupNorm(2, 4, affine=False).state_dict()) == \
        list(torch.nn.GroupNorm(2, 4, affine=False).state_dict()) == []


def test_deform_conv2d_module_matches_conv2d_with_zero_offsets():
    torch.manual_seed(0)
    m = ft.DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2)
    assert list(m.state_dict()) == ["weight", "bias"]
    assert m.weight.shape == (6, 2, 3, 3) and m.bias.shape == (6,)
    assert list(ft.DeformConv2d(4, 6, 3, bias=False).state_dict()) == ["weight"]
    x = torch.randn(2, 4, 7, 7)
    off = torch.zeros(2, 18, 7, 7)
    ref = torch.nn.functional.conv2d(x, m.weight, m.bias, padding=1, groups=2)
    torch.testing.assert_close(m(x, off), ref, rtol=1e-4, atol=1e-4)
    half = torch.full((2, 9, 7, 7), 0.5)
    torch.testing.assert_close(m(x, off, half) - m.bias[:, None, None],
                               0.5 * (ref - m.bias[:, None, None]), rtol=1e-4, atol=1e-4)


def test_modulated_deform_conv2d_mmcv_layout():
    torch.manual_seed(0)
    m = ft.ModulatedDeformConv2d(4, 6, 3, padding=1, deform_groups=2)
    assert list(m.state_dict()) == ["weight", "bias", "conv_offset.weight", "conv_offset.bias"]
    assert m.conv_offset.weight.shape == (3 * 2 * 9, 4, 3, 3)
    # zero-initialised offset branch: offset 0, mask sigmoid(0) = 0.5
    x = torch.randn(2, 4, 6, 6)
    ref = 0.5 * torch.nn.functional.conv2d(x, m.weight, None, padding=1)
    torch.testing.assert_close(m(x) - m.bias[:, None, None], ref, rtol=1e-4, atol=1e-4)


def test_torchvision_state_dict_compatible():
    tv = pytest.importorskip("torchvision")
    ref = tv.ops.DeformConv2d(4, 6, 3, padding=1)
    ours = ft.DeformConv2d(4, 6, 3, padding=1)
    ours.load_state_dict(ref.state_dict())
    x, off = torch.randn(1, 4, 5, 5), torch.randn(1, 18, 5, 5)
    torch.testing.assert_close(ours(x, off), ref(x, off), rtol=1e-4, atol=1e-4)
    assert ft.RoIAlign(7, 0.25, 2, True).state_dict() == \
        tv.ops.RoIAlign(7, 0.25, 2, True).state_dict()


def test_roi_modules(rng):
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    rois = _rois(rng, 6, 2, 9, np.float32)
    m = ft.RoIAlign((2, 2), 0.5, 2, aligned=True)
    assert not list(m.state_dict()) and "aligned=True" in repr(m)
    np.testing.assert_array_equal(m(_t(x), _t(rois)).numpy(),
                                  fastnorm.roi_align(x, rois, 2, 0.5, 2, True))
    np.testing.assert_array_equal(ft.RoIPool(2, 0.5)(_t(x), _t(rois)).numpy(),
                                  fastnorm.roi_pool(x, rois, 2, 0.5))
    np.testing.assert_array_equal(ft.PSRoIAlign(2, 0.5, 2)(_t(x), _t(rois)).numpy(),
                                  fastnorm.ps_roi_align(x, rois, 2, 0.5, 2))
    rot = _rotated(rois)
    m = ft.RoIAlignRotated(2, 0.5, 2, clockwise=True, angle_unit="radians")
    assert not list(m.state_dict()) and "clockwise=True" in repr(m)
    np.testing.assert_array_equal(m(_t(x), _t(rot)).numpy(), fastnorm.roi_align_rotated(
        x, rot, 2, 0.5, 2, clockwise=True, angle_unit="radians"))
    # the list form: per-image (K_i, 5) rotated boxes
    order = np.argsort(rot[:, 0], kind="stable")
    per_image = [_t(rot[order][rot[order, 0] == i, 1:]) for i in range(2)]
    np.testing.assert_array_equal(ft.roi_align_rotated(_t(x), per_image, 2, 0.5, 2).numpy(),
                                  fastnorm.roi_align_rotated(x, rot, 2, 0.5, 2)[order])
    # multi-scale: a list (or dict) of levels, rois (K, 5) or per image
    feats = [rng.standard_normal((2, 8, 9 >> i, 9 >> i)).astype(np.float32) for i in range(3)]
    kw = dict(canonical_scale=4, canonical_level=1, spatial_scales=[1.0, 0.5, 0.25])
    m = ft.MultiScaleRoIAlign(2, 2, aligned=False, **kw)
    assert not list(m.state_dict()) and "canonical_scale=4" in repr(m)
    want = fastnorm.multi_scale_roi_align(feats, rois, 2, sampling_ratio=2, aligned=False, **kw)
    np.testing.assert_array_equal(m([_t(f) for f in feats], _t(rois)).numpy(), want)
    per_image = [_t(rois[order][rois[order, 0] == i, 1:]) for i in range(2)]
    np.testing.assert_array_equal(m({"p2": _t(feats[0]), "p3": _t(feats[1]),
                                     "p4": _t(feats[2])}, per_image).numpy(), want[order])


def test_rotated_box_functions_match_fastnorm(rng):
    b = _rotated(_rois(rng, 30, 1, 40, np.float32))[:, 1:]
    s, labels = rng.random(30).astype(np.float32), rng.integers(0, 3, 30)
    np.testing.assert_array_equal(ft.box_iou_rotated(_t(b), _t(b[:7]), clockwise=True).numpy(),
                                  fastnorm.box_iou_rotated(b, b[:7], clockwise=True))
    keep = ft.nms_rotated(_t(b), _t(s), 0.3)
    assert keep.dtype == torch.int64 and 0 < len(keep) < 30
    np.testing.assert_array_equal(keep.numpy(), fastnorm.nms_rotated(b, s, 0.3))
    np.testing.assert_array_equal(
        ft.batched_nms_rotated(_t(b), _t(s), _t(labels), 0.3, angle_unit="radians").numpy(),
        fastnorm.batched_nms_rotated(b, s, labels, 0.3, angle_unit="radians"))


# ---------------------------------------------------------------- a tiny model trains

def test_tiny_detection_head_trains():
    torch.manual_seed(0)
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.norm = ft.GroupNorm(4, 8, activation="silu")
            self.dcn = ft.ModulatedDeformConv2d(8, 8, 3, padding=1)
            self.pool = ft.RoIAlign(3, 1.0, 2, aligned=True)
            self.fc = torch.nn.Linear(8 * 9, 2)

        def forward(self, x, rois):
            f = self.dcn(self.norm(self.stem(x)))
            return self.fc(self.pool(f, rois).flatten(1))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 12, 12, generator=g)
    rois = torch.tensor([[0, 1, 1, 6, 7], [0, 4, 2, 11, 9], [1, 0, 3, 8, 8], [1, 5, 5, 10, 11]],
                        dtype=torch.float32)
    target = torch.randn(4, 2, generator=g)
    model = Head()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, rois), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    assert model.dcn.conv_offset.weight.grad.abs().sum() > 0      # the offset branch learns


# ---------------------------------------------------------------- CUDA (skips without a GPU)

@pytest.mark.cuda
def test_cuda_matches_cpu(rng):
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    rois = _rois(rng, 5, 2, 9, np.float32)
    gn = ft.GroupNorm(4, 8, activation="silu")
    xc = _t(x, True)
    gn(xc).square().sum().backward()
    gn_cuda = ft.GroupNorm(4, 8, activation="silu").cuda()
    gn_cuda.load_state_dict(gn.state_dict())
    xg = _t(x).cuda().requires_grad_()
    gn_cuda(xg).square().sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gn_cuda.weight.grad.cpu(), gn.weight.grad, rtol=1e-4, atol=1e-3)
    xr = _t(x, True)
    ft.roi_align(xr, _t(rois), 3, 0.5, 2, True).sum().backward()
    xrg = _t(x).cuda().requires_grad_()
    y = ft.roi_align(xrg, _t(rois).cuda(), 3, 0.5, 2, True)
    assert y.is_cuda
    y.sum().backward()
    torch.testing.assert_close(xrg.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- custom operators

def _op_cases(rng, dtype, k):
    """(op, args) of every fastnorm:: operator on small inputs of ``dtype``; ``k`` RoIs/boxes
    (0: the empty case)."""
    t = lambda a, g=True: torch.from_numpy(np.ascontiguousarray(a).astype(dtype)).requires_grad_(g)  # noqa: E731,E501
    x, x8 = t(rng.standard_normal((2, 6, 6, 6))), t(rng.standard_normal((2, 8, 6, 6)))
    w, b = t(rng.standard_normal(6)), t(rng.standard_normal(6))
    off, m = t(rng.uniform(-1, 1, (2, 18, 6, 6))), t(rng.random((2, 9, 6, 6)))
    wc = t(rng.standard_normal((4, 6, 3, 3)))
    rois = t(_rois(rng, k, 2, 6), False)
    off_r, m_r = t(rng.uniform(-0.2, 0.2, (k, 2, 2, 2))), t(rng.random((k, 1, 2, 2)))
    boxes = t(_rois(rng, 3 * k, 1, 40)[:, 1:], False)
    scores, labels = t(rng.random(3 * k), False), torch.from_numpy(rng.integers(0, 3, 3 * k))
    rot = t(_rotated(_rois(rng, k, 2, 6)), False)
    rboxes = t(_rotated(_rois(rng, 3 * k, 1, 40))[:, 1:], False)
    ops = torch.ops.fastnorm
    return [
        (ops.group_norm, (x, w, b, 3, 1e-5, "silu")),
        (ops.group_norm, (x, None, None, 2, 1e-5, "none")),
        (ops.deform_conv2d, (x, off, m, wc, b[:4], [1, 1], [1, 1], [1, 1])),
        (ops.deform_conv2d, (x, off[:, :, ::2, ::2].contiguous(), None, wc, None, [2, 2], [1, 1],
                             [1, 1])),
        (ops.roi_align, (x, rois, [2, 3], 0.5, 2, True, "avg")),
        (ops.roi_align, (x, rois, [2, 2], 1.0, 2, False, "max")),
        (ops.roi_pool, (x, rois, [2, 2], 1.0)),
        (ops.ps_roi_align, (x8, rois, [2, 2], 1.0, 2)),
        (ops.deform_roi_pool, (x, rois, off_r, m_r, [2, 2], 1.0, 2, 0.1)),
        (ops.deform_roi_pool, (x, rois, None, None, [2, 2], 1.0, 2, 0.1)),
        (ops.nms, (boxes, scores, 0.5)),
        (ops.batched_nms, (boxes, scores, labels, 0.5)),
        (ops.roi_align_rotated, (x, rot, [2, 3], 0.5, 2, True, False, "degrees")),
        (ops.roi_align_rotated, (x, rot, [2, 2], 1.0, -1, False, True, "radians")),
        (ops.box_iou_rotated, (rboxes, rboxes[:k], False, "degrees")),
        (ops.nms_rotated, (rboxes, scores, 0.5, True, "degrees")),
        (ops.batched_nms_rotated, (rboxes, scores, labels, 0.5, False, "radians")),
        (ops.multi_scale_roi_align, ([x, t(rng.standard_normal((2, 6, 3, 3))),
                                      t(rng.standard_normal((2, 6, 2, 2)))], rois, [2, 3],
                                     [1.0, 0.5, 0.25], 3.0, 1, 2, True)),
        (ops.multi_scale_roi_align, ([x], rois, [2, 2], None, 224.0, 4, -1, False)),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [4, 0])
def test_opcheck_every_operator(rng, dtype, k, device):
    """torch.library.opcheck: schema, fake (meta) implementation against the real one, autograd
    registration and AOT dispatch, forward and backward, for every fastnorm:: operator."""
    def move(a):
        if isinstance(a, list):
            return [move(e) for e in a]
        return a.to(device).detach().requires_grad_(a.requires_grad) \
            if isinstance(a, torch.Tensor) else a
    cases = [(op, tuple(move(a) for a in args)) for op, args in _op_cases(rng, dtype, k)]
    assert {op._qualified_op_name.split("::")[1] for op, _ in cases} | {
        f"{n}_backward" for n in ("group_norm", "deform_conv2d", "roi_align", "roi_pool",
                                  "ps_roi_align", "deform_roi_pool", "roi_align_rotated",
                                  "multi_scale_roi_align")} == \
        {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
         if n.startswith("fastnorm::")}
    for op, args in cases:
        torch.library.opcheck(op, args)


class _Head(torch.nn.Module):
    """A small two-stage detection head with every module and op of fastnorm.torch."""

    def __init__(self, C=8):
        super().__init__()
        self.gn = ft.GroupNorm(4, C, activation="silu")
        self.offset = torch.nn.Conv2d(C, 18, 3, padding=1)
        self.dcn = ft.DeformConv2d(C, C, 3, padding=1)
        self.mdcn = ft.ModulatedDeformConv2d(C, C, 3, padding=1)
        self.align = ft.RoIAlign(2, 0.5, 2, aligned=True)
        self.pool = ft.RoIPool(2, 0.5)
        self.ps = ft.PSRoIAlign(2, 0.5, 2)
        self.droi_offset = torch.nn.Linear(C * 4, 8)
        self.cls = torch.nn.Linear(C * 4 * 3 + C // 4 * 4, 3)

    def forward(self, x, rois):
        h = self.mdcn(self.dcn(self.gn(x), self.offset(self.gn(x))))
        a = self.align(h, rois).flatten(1)
        off = self.droi_offset(a).view(-1, 2, 2, 2) * 0.1
        feats = torch.cat([a, self.pool(h, rois).flatten(1), self.ps(h, rois).flatten(1),
                           ft.deform_roi_pool(h, rois, off, 2, 0.5, 2).flatten(1)], 1)
        logits = self.cls(feats)
        scores, labels = logits.detach().softmax(1).max(1)
        return (logits, ft.batched_nms(rois[:, 1:], scores, labels, 0.5),
                ft.nms(rois[:, 1:], scores, 0.5))


def _head_inputs(n=2, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 12
    rois = torch.cat([torch.randint(0, n, (k, 1), generator=g).float(), xy,
                      xy + 2 + torch.rand(k, 2, generator=g) * 10], 1)
    return torch.randn(n, 8, 16, 16, generator=g), rois


def test_compile_fullgraph_matches_eager_and_trains():
    torch.manual_seed(0)
    model, (x, rois) = _Head(), _head_inputs()
    eager = model(x, rois)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, rois)
    torch.testing.assert_close(out[0], eager[0])
    assert torch.equal(out[1], eager[1]) and torch.equal(out[2], eager[2])
    # gradients through the compiled graph equal eager's, and a few steps lower the loss
    target = torch.tensor([0, 1, 2] * 4)
    loss = torch.nn.functional.cross_entropy(out[0], target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(eager[0], target),
                              list(model.parameters()))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(compiled(x, rois)[0], target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_compile_inductor_fullgraph_matches_eager():
    torch.manual_seed(1)
    model, (x, rois) = _Head(), _head_inputs(seed=1)
    torch._dynamo.reset()
    # no on-disk graph cache: its key does not cover a changed fastnorm:: op schema
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(model, fullgraph=True)(x, rois)    # the default backend: inductor
        params = list(model.parameters())                       # the compiled backward too
        grads = torch.autograd.grad(out[0].square().sum(), params)
    eager = model(x, rois)
    torch.testing.assert_close(out[0], eager[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], eager[1]) and torch.equal(out[2], eager[2])
    for g, r in zip(grads, torch.autograd.grad(eager[0].square().sum(), params)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_export_with_a_dynamic_batch_runs():
    from torch.export import Dim, export
    torch.manual_seed(2)
    model, (x, rois) = _Head(), _head_inputs()
    ep = export(model, (x, rois), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)},
                                                   "rois": {0: Dim("rois", min=1)}})
    names = {n.target.name() for n in ep.graph.nodes if n.op == "call_function"
             and hasattr(n.target, "name") and n.target.name().startswith("fastnorm::")}
    assert names == {"fastnorm::group_norm", "fastnorm::deform_conv2d", "fastnorm::roi_align",
                     "fastnorm::roi_pool", "fastnorm::ps_roi_align", "fastnorm::deform_roi_pool",
                     "fastnorm::batched_nms", "fastnorm::nms"}, names
    for n, k in ((2, 12), (3, 7)):                        # another batch size and RoI count
        x, rois = _head_inputs(n, k, seed=n)
        got, want = ep.module()(x, rois), model(x, rois)
        torch.testing.assert_close(got[0], want[0])
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


# ---------------------------------------------------------------- ONNX export

class _OnnxHead(torch.nn.Module):
    """The ops with a standard ONNX translation: GroupNorm + SiLU, DCN v1 and v2, RoIAlign
    (aligned and not), RoIPool, NMS and class-aware NMS."""

    def __init__(self, C=8):
        super().__init__()
        self.gn = ft.GroupNorm(4, C, activation="silu")
        self.gn_relu = ft.GroupNorm(2, C, activation="relu", affine=False)
        self.offset = torch.nn.Conv2d(C, 18, 3, padding=1)
        self.dcn = ft.DeformConv2d(C, C, 3, padding=1)
        self.mdcn = ft.ModulatedDeformConv2d(C, C, 3, padding=1, groups=2, deform_groups=2)
        self.align = ft.RoIAlign(2, 0.5, 2, aligned=True)
        self.align_legacy = ft.RoIAlign((3, 2), 0.5, -1, aligned=False)
        self.pool = ft.RoIPool(2, 0.5)
        with torch.no_grad():                           # offsets and masks that do something
            self.offset.weight.normal_(0, 0.1)
            self.mdcn.conv_offset.weight.normal_(0, 0.05)

    def forward(self, x, rois):
        h = self.gn_relu(self.gn(x))
        h = self.mdcn(self.dcn(h, self.offset(h)))
        a, b, p = self.align(h, rois), self.align_legacy(h, rois), self.pool(h, rois)
        scores = a.mean((1, 2, 3)).sigmoid()
        labels = (b.mean((1, 2, 3)) > 0).long() + (p.mean((1, 2, 3)) > 0).long()
        return h, a, b, p, ft.nms(rois[:, 1:], scores, 0.3), \
            ft.batched_nms(rois[:, 1:], scores, labels, 0.3)


def _onnx_program(model, x, rois):
    pytest.importorskip("onnxscript")
    return torch.onnx.export(model, (x, rois), dynamo=True, opset_version=21,
                             custom_translation_table=ft.onnx_translation_table())


def test_onnx_export_uses_standard_operators_and_runs_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(3)
    model = _OnnxHead()
    x, rois = _head_inputs(2, 40, seed=3)          # overlapping RoIs: the NMS ops suppress
    prog = _onnx_program(model, x, rois)
    nodes = {(n.domain, n.op_type) for n in prog.model_proto.graph.node}
    assert {("", op) for op in ("GroupNormalization", "DeformConv", "RoiAlign", "MaxRoiPool",
                                "NonMaxSuppression", "Sigmoid")} <= nodes, nodes
    assert not any(domain for domain, _ in nodes), nodes
    assert {i.version for i in prog.model_proto.opset_import if i.domain == ""} == {21}
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (x.numpy(), rois.numpy()))))
    want = [t.detach().numpy() for t in model(x, rois)]
    for g, w in zip(got[:4], want[:4]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    for g, w in zip(got[4:], want[4:]):
        assert 0 < len(w) < len(rois) and np.array_equal(g, w)


def test_onnx_export_without_an_onnx_operator_emits_custom_domain_nodes():
    torch.manual_seed(4)
    model, (x, rois) = _Head(), _head_inputs(seed=4)
    nodes = {(n.domain, n.op_type) for n in _onnx_program(model, x, rois).model_proto.graph.node}
    assert {("fastnorm", "PSRoIAlign"), ("fastnorm", "DeformRoIPool")} <= nodes, nodes

    class MaxAlign(torch.nn.Module):
        def forward(self, x, rois):
            return ft.roi_align(x, rois, 2, 0.5, 2, True, mode="max")
    nodes = {(n.domain, n.op_type) for n in _onnx_program(MaxAlign(), x, rois).model_proto.graph.node}
    assert ("fastnorm", "RoIAlign") in nodes and ("", "RoiAlign") not in nodes

    class Rotated(torch.nn.Module):
        def forward(self, x, rois):
            boxes = rois[:, 1:]
            scores = boxes[:, 2] * boxes[:, 3]
            return (ft.roi_align_rotated(x, rois, 2, 0.5, 2, clockwise=True),
                    ft.box_iou_rotated(boxes, boxes), ft.nms_rotated(boxes, scores, 0.5),
                    ft.batched_nms_rotated(boxes, scores, rois[:, 0].long(), 0.5))
    rot = torch.from_numpy(_rotated(rois.numpy()))
    nodes = [n for n in _onnx_program(Rotated(), x, rot).model_proto.graph.node
             if n.domain == "fastnorm"]
    assert sorted(n.op_type for n in nodes) == ["BatchedNMSRotated", "BoxIouRotated",
                                                "NMSRotated", "RoIAlignRotated"]
    clockwise = {n.op_type: next(a.i for a in n.attribute if a.name == "clockwise")
                 for n in nodes}
    assert clockwise == {"RoIAlignRotated": 1, "BoxIouRotated": 0, "NMSRotated": 0,
                         "BatchedNMSRotated": 0}


def test_onnx_export_of_multi_scale_roi_align_is_one_custom_node():
    pytest.importorskip("onnxscript")

    class Pyramid(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = ft.MultiScaleRoIAlign(2, 2, canonical_scale=16, canonical_level=3)

        def forward(self, p2, p3, rois):
            return self.pool([p2, p3], rois)
    p2, p3 = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8)
    rois = torch.tensor([[0, 1.0, 1, 20, 30], [1, 4, 4, 60, 50]])
    prog = torch.onnx.export(Pyramid(), (p2, p3, rois), dynamo=True, opset_version=21,
                             custom_translation_table=ft.onnx_translation_table())
    nodes = [n for n in prog.model_proto.graph.node if n.domain == "fastnorm"]
    assert [n.op_type for n in nodes] == ["MultiScaleRoIAlign"] and len(nodes[0].input) == 3
    attrs = {a.name: a for a in nodes[0].attribute}
    assert list(attrs["spatial_scales"].floats) == [0.25, 0.125]
    assert attrs["canonical_level"].i == 3 and attrs["aligned"].i == 1
