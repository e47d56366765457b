"""up/down_block_shortcut: the references against the unfused block math and an index-by-index
definition, the CUDA kernels against the references (all layouts, dtypes, both main-path
modes), tracing and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcgen.ops import (
    channel_duplicate_to_space,
    down_block_shortcut,
    down_block_shortcut_reference,
    has_kernel,
    space_to_channel_average,
    up_block_shortcut,
    up_block_shortcut_reference,
)
from dcgen.ops._extension import compiled_op
from tests.conftest import misaligned_copy, poison_cuda_allocator, registered_cpu_kernel

# (B, Cin, H, W, Cout): the DC-AE ratios (Cin = 2*Cout up, Cout = 2*Cin down), repeats of 1
# and 4, odd spatial sizes, 1x1 maps. Cout % 8 == 0 with repeats 1, 2 and 4 and several channel
# groups: on CUDA, channels_last 16-bit pixel-shuffled inputs take the 8-channel kernel.
UP_CASES = [(2, 8, 5, 7, 4), (1, 16, 3, 3, 4), (1, 4, 1, 1, 4), (2, 6, 4, 9, 3), (1, 3, 2, 2, 3),
            (2, 16, 5, 7, 8), (1, 8, 3, 4, 8), (1, 32, 2, 3, 8), (2, 64, 4, 5, 32),
            (2, 16, 1, 5, 8), (1, 32, 3, 1, 8)]  # fmt: skip
DOWN_CASES = [
    (2, 4, 6, 10, 8),
    (1, 8, 4, 4, 8),
    (1, 4, 2, 2, 16),
    (2, 6, 2, 6, 12),
    (1, 3, 4, 2, 12),
]
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def _up_inputs(case, shuffle, dtype, gen):
    b, cin, h, w, cout = case
    x = torch.randn(b, cin, h, w, generator=gen).to(dtype)
    yshape = (b, 4 * cout, h, w) if shuffle else (b, cout, 2 * h, 2 * w)
    return torch.randn(yshape, generator=gen).to(dtype), x


def _down_inputs(case, unshuffle, dtype, gen):
    b, cin, h, w, cout = case
    x = torch.randn(b, cin, h, w, generator=gen).to(dtype)
    yshape = (b, cout // 4, h, w) if unshuffle else (b, cout, h // 2, w // 2)
    return torch.randn(yshape, generator=gen).to(dtype), x


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("case", UP_CASES)
def test_up_reference_equals_unfused_block_math(case, shuffle, rng):
    y, x = _up_inputs(case, shuffle, torch.float32, rng)
    cout = case[4]
    main = F.pixel_shuffle(y, 2) if shuffle else y
    want = main + channel_duplicate_to_space(x, cout, 2)
    torch.testing.assert_close(up_block_shortcut_reference(y, x, shuffle), want, atol=0, rtol=0)


@pytest.mark.parametrize("unshuffle", [True, False])
@pytest.mark.parametrize("case", DOWN_CASES)
def test_down_reference_equals_unfused_block_math(case, unshuffle, rng):
    y, x = _down_inputs(case, unshuffle, torch.float32, rng)
    main = F.pixel_unshuffle(y, 2) if unshuffle else y
    want = main + space_to_channel_average(x, case[4], 2)
    torch.testing.assert_close(down_block_shortcut_reference(y, x, unshuffle), want)


def test_up_reference_index_by_index(rng):
    # Independent of pixel_shuffle: out[c, 2h+i, 2w+j] = y[4c+2i+j, h, w] + x[(4c+2i+j)//r, h, w].
    y, x = _up_inputs((1, 4, 2, 3, 2), True, torch.float32, rng)  # r = 4*2/4 = 2
    out = up_block_shortcut_reference(y, x, True)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                k = 4 * c + 2 * i + j
                torch.testing.assert_close(out[0, c, i::2, j::2], y[0, k] + x[0, k // 2])


def test_down_reference_index_by_index(rng):
    # out[o, h, w] = y[o//4, 2h+(o//2)%2, 2w+o%2] + mean_g x[m//4, 2h+(m//2)%2, 2w+m%2], m = o*G+g.
    y, x = _down_inputs((1, 4, 4, 2, 8), True, torch.float32, rng)  # G = 16/8 = 2
    out = down_block_shortcut_reference(y, x, True)
    for o in range(8):
        main = y[0, o // 4, (o // 2) % 2 :: 2, o % 2 :: 2]
        parts = [x[0, m // 4, (m // 2) % 2 :: 2, m % 2 :: 2] for m in (2 * o, 2 * o + 1)]
        torch.testing.assert_close(out[0, o], main + (parts[0] + parts[1]) / 2)


def test_bf16_reference_rounds_once(rng):
    # The fp32 sum is rounded once: equal to the fp32 result rounded to bf16.
    y, x = _up_inputs((1, 8, 4, 4, 4), True, torch.bfloat16, rng)
    want = up_block_shortcut_reference(y.float(), x.float(), True).to(torch.bfloat16)
    torch.testing.assert_close(up_block_shortcut_reference(y, x, True), want, atol=0, rtol=0)


def _layouts(y, x):
    cl = torch.channels_last
    yield "contiguous", y, x
    yield "channels_last", y.to(memory_format=cl), x.to(memory_format=cl)
    yield "mixed", y.to(memory_format=cl), x
    yield "strided", y.transpose(2, 3).contiguous().transpose(2, 3), x[:, :, :, :]


def _check_kernel(name, cases, make, reference, dtype, gen):
    kernel = compiled_op(name)
    for case in cases:
        for flag in (True, False):
            y, x = make(case, flag, dtype, gen)
            for layout, yl, xl in _layouts(y.cuda(), x.cuda()):
                poison_cuda_allocator()
                got = kernel(yl, xl, flag)
                want = reference(yl.cpu().float(), xl.cpu().float(), flag)
                assert got.dtype == dtype and got.shape == want.shape, (layout, case)
                assert not got.isnan().any(), f"unwritten output ({layout}, {case}, {flag})"
                atol, rtol = TOL[dtype]
                torch.testing.assert_close(
                    got.cpu().float(), want, atol=atol, rtol=rtol, msg=f"{layout} {case} {flag}"
                )
                # The documented layout rule (and the fakes'): channels_last out when y is
                # channels_last and not also plain contiguous (a 1x1 map is both), else NCHW.
                # (A min(out.shape) > 1 condition missed the 1x1-input up case: measured on the
                # H200, the kernel is right and that check was wrong.)
                cl = torch.channels_last
                y_cl = yl.is_contiguous(memory_format=cl) and not yl.is_contiguous()
                fmt = cl if y_cl else torch.contiguous_format
                assert got.is_contiguous(memory_format=fmt), (layout, case, flag)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_up_kernel_matches_reference(dtype, rng):
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for up_block_shortcut")
    _check_kernel(
        "up_block_shortcut", UP_CASES, _up_inputs, up_block_shortcut_reference, dtype, rng
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_down_kernel_matches_reference(dtype, rng):
    if not has_kernel("down_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for down_block_shortcut")
    _check_kernel(
        "down_block_shortcut", DOWN_CASES, _down_inputs, down_block_shortcut_reference, dtype, rng
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_up_channels_last_views(dtype, rng):
    # Views as the banded decode makes them: a row band of a later batch element (16-byte
    # aligned offsets: the 8-channel kernel) and channels_last-dense views one element into
    # their storage (misaligned: the host gate must send them to the per-element kernel).
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for up_block_shortcut")
    kernel = compiled_op("up_block_shortcut")
    y, x = _up_inputs((2, 32, 5, 6, 16), True, dtype, rng)
    cl = torch.channels_last
    yc, xc = y.cuda().to(memory_format=cl), x.cuda().to(memory_format=cl)
    views = {
        "band": (yc[1:2, :, 1:4], xc[1:2, :, 1:4], y[1:2, :, 1:4], x[1:2, :, 1:4]),
        "misaligned": (misaligned_copy(yc), misaligned_copy(xc), y, x),
    }
    for name, (yv, xv, ycpu, xcpu) in views.items():
        poison_cuda_allocator()
        got = kernel(yv, xv, True)
        assert not got.isnan().any(), f"unwritten output ({name})"
        want = up_block_shortcut_reference(ycpu.float(), xcpu.float(), True)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.cpu().float(), want, atol=atol, rtol=rtol, msg=name)


@pytest.mark.cuda
def test_cuda_decoder_sized_map(rng):
    # A stage-sized map (many blocks, grid-stride loop) at bf16, both ops.
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernels for the block shortcuts")
    y, x = _up_inputs((1, 64, 96, 80, 32), True, torch.bfloat16, rng)
    y, x = y.cuda(), x.cuda()
    for fmt in (torch.contiguous_format, torch.channels_last):  # the two kernels
        yf, xf = y.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
        poison_cuda_allocator()
        got = up_block_shortcut(yf, xf)
        torch.testing.assert_close(got, up_block_shortcut_reference(y, x), atol=0, rtol=0)
    yd, xd = _down_inputs((1, 32, 192, 160, 64), True, torch.bfloat16, rng)
    yd, xd = yd.cuda(), xd.cuda()
    poison_cuda_allocator()
    got = down_block_shortcut(yd, xd)
    want = down_block_shortcut_reference(yd.float(), xd.float()).to(torch.bfloat16)
    torch.testing.assert_close(got, want, atol=8e-3, rtol=8e-3)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile(rng):
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernels for the block shortcuts")
    y, x = _up_inputs((2, 8, 4, 6, 4), True, torch.float32, rng)
    yd, xd = _down_inputs((2, 4, 4, 6, 8), True, torch.float32, rng)
    cl = torch.channels_last
    for op, args in [
        (torch.ops.dcgen.up_block_shortcut.default, (y.cuda(), x.cuda(), True)),
        (
            torch.ops.dcgen.up_block_shortcut.default,
            (y.cuda().to(memory_format=cl), x.cuda(), True),
        ),
        (torch.ops.dcgen.down_block_shortcut.default, (yd.cuda(), xd.cuda(), True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda y, x: up_block_shortcut(y, x) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(y.cuda(), x.cuda()), up_block_shortcut_reference(y, x).cuda() * 2)


def test_public_ops_fall_back_and_are_differentiable(rng):
    y, x = _up_inputs((1, 4, 3, 3, 2), True, torch.float64, rng)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, x: up_block_shortcut(y, x), (y, x))
    yd, xd = _down_inputs((1, 4, 2, 2, 8), True, torch.float64, rng)
    xd.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, x: down_block_shortcut(y, x), (yd, xd))


@pytest.mark.parametrize(
    "fn, args, err, match",
    [
        (
            up_block_shortcut,
            (torch.randn(1, 6, 2, 2), torch.randn(1, 2, 2, 2)),
            ValueError,
            "4\\*Cout",
        ),
        (up_block_shortcut, (torch.randn(1, 8, 3, 2), torch.randn(1, 2, 2, 2)), ValueError, "H, W"),
        (
            up_block_shortcut,
            (torch.randn(1, 3, 4, 4), torch.randn(1, 5, 2, 2), False),
            ValueError,
            "not a multiple",
        ),
        (
            up_block_shortcut,
            (torch.randn(1, 8, 2, 2), torch.randn(1, 2, 2, 2).half()),
            TypeError,
            "one dtype",
        ),
        (
            up_block_shortcut,
            (torch.randn(1, 8, 2, 2), torch.randn(2, 2, 2, 2)),
            ValueError,
            "batch size",
        ),
        (up_block_shortcut, (torch.randn(8, 2, 2), torch.randn(1, 2, 2, 2)), ValueError, "4 dims"),
        (
            down_block_shortcut,
            (torch.randn(1, 2, 3, 4), torch.randn(1, 4, 3, 4)),
            ValueError,
            "even",
        ),
        (
            down_block_shortcut,
            (torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)),
            ValueError,
            "Cout=12",
        ),
        (
            down_block_shortcut,
            (torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), False),
            ValueError,
            "half x's",
        ),
    ],
)
def test_bad_input_errors(fn, args, err, match):
    with pytest.raises(err, match=match):
        fn(*args)


# ---------------------------------------------- up_block_shortcut with bias= and out=


def _bias_for(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(y.shape[1], generator=gen).to(y.dtype)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("case", UP_CASES)
def test_up_reference_with_bias_equals_unfused_block_math(case, shuffle, rng):
    # The conv bias belongs to y (before the shuffle): (y + bias) then the block, in fp32.
    y, x = _up_inputs(case, shuffle, torch.float32, rng)
    bias = _bias_for(y, rng)
    main = y + bias.view(1, -1, 1, 1)
    main = F.pixel_shuffle(main, 2) if shuffle else main
    want = main + channel_duplicate_to_space(x, case[4], 2)
    got = up_block_shortcut_reference(y, x, shuffle, bias)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_up_reference_with_bias_rounds_once(rng):
    y, x = _up_inputs((1, 8, 4, 4, 4), True, torch.bfloat16, rng)
    bias = _bias_for(y, rng)
    want = up_block_shortcut_reference(y.float(), x.float(), True, bias.float())
    got = up_block_shortcut_reference(y, x, True, bias)
    torch.testing.assert_close(got, want.to(torch.bfloat16), atol=0, rtol=0)


def _nan_rows_band(shape, dtype, device, extra_rows=3, fmt=torch.channels_last):
    """(full, band): a NaN-filled map ``extra_rows`` taller than ``shape`` and the band of
    ``shape``'s rows that starts at row 2 (a batch-1 channels_last band is dense)."""
    b, c, h, w = shape
    full = torch.full((b, c, h + extra_rows, w), float("nan"), dtype=dtype, device=device)
    full = full.contiguous(memory_format=fmt)
    return full, full[:, :, 2 : 2 + h]


@pytest.mark.parametrize("bias", [False, True])
def test_up_public_op_writes_into_a_band_of_out(bias, rng):
    # CPU (the reference, then copied in): the band holds the result, the rows around it are
    # untouched, and out itself is returned.
    y, x = _up_inputs((1, 16, 3, 5, 8), True, torch.float32, rng)
    y, x = y.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    b = _bias_for(y, rng) if bias else None
    full, band = _nan_rows_band((1, 8, 6, 10), torch.float32, "cpu")
    got = up_block_shortcut(y, x, True, bias=b, out=band)
    assert got is band
    torch.testing.assert_close(band, up_block_shortcut_reference(y, x, True, b), atol=0, rtol=0)
    assert full[:, :, :2].isnan().all() and full[:, :, 8:].isnan().all()


def test_up_public_op_with_bias_is_differentiable(rng):
    y, x = _up_inputs((1, 4, 3, 3, 2), True, torch.float64, rng)
    bias = torch.randn(y.shape[1], dtype=torch.float64, generator=rng, requires_grad=True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, b: up_block_shortcut(y, x, True, bias=b), (y, bias))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(bias=torch.randn(7)), ValueError, r"expected a bias of y's 8 channels, got \(7,\)"),
        (dict(bias=torch.randn(8).half()), TypeError, "up_block_shortcut: bias"),
        (dict(bias=torch.randn(2, 4)), ValueError, "up_block_shortcut: bias"),
        (
            dict(out=torch.empty(1, 2, 4, 6)),
            ValueError,
            r"expected out of shape \(1, 2, 4, 4\), got \(1, 2, 4, 6\)",
        ),
        (dict(out=torch.empty(1, 2, 4, 4).half()), TypeError, "up_block_shortcut: out"),
    ],
)
def test_up_bias_and_out_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        up_block_shortcut(torch.randn(1, 8, 2, 2), torch.randn(1, 2, 2, 2), True, **kwargs)


@pytest.fixture
def cpu_out_kernel(monkeypatch):
    """A CPU kernel for dcgen::up_block_shortcut_out that runs the reference into out (the CUDA
    kernel is tested against the same reference below), visible to has_kernel; yields the
    (bias given, out's data pointer) of each call."""
    calls: list[tuple[bool, int]] = []

    def kernel(y, x, shuffle_y, bias, out):  # noqa: ANN001, ANN202
        calls.append((bias is not None, out.data_ptr()))
        out.copy_(up_block_shortcut_reference(y, x, shuffle_y, bias))

    with registered_cpu_kernel(monkeypatch, "up_block_shortcut_out", kernel):
        yield calls


def test_up_public_op_hands_dense_outs_to_the_kernel(cpu_out_kernel, rng):
    # A dense band of a channels_last map goes to the kernel as it is; an out laid out unlike
    # the kernel's output, or one sharing memory with x, gets the result copied in.
    y, x = _up_inputs((1, 16, 3, 5, 8), True, torch.float32, rng)
    cl = torch.channels_last
    y, x = y.to(memory_format=cl), x.to(memory_format=cl)
    bias = _bias_for(y, rng)
    want = up_block_shortcut_reference(y, x, True, bias)
    full, band = _nan_rows_band((1, 8, 6, 10), torch.float32, "cpu")
    up_block_shortcut(y, x, True, bias=bias, out=band)
    assert cpu_out_kernel == [(True, band.data_ptr())]
    torch.testing.assert_close(band, want, atol=0, rtol=0)
    assert full[:, :, :2].isnan().all() and full[:, :, 8:].isnan().all()

    cpu_out_kernel.clear()
    nchw = torch.full_like(want, float("nan"), memory_format=torch.contiguous_format)
    up_block_shortcut(y, x, True, bias=bias, out=nchw)
    assert len(cpu_out_kernel) == 1 and cpu_out_kernel[0][1] != nchw.data_ptr()
    torch.testing.assert_close(nchw, want, atol=0, rtol=0)

    cpu_out_kernel.clear()
    got = up_block_shortcut(y, x, True, bias=bias)  # no out: a fresh one, y's layout
    assert len(cpu_out_kernel) == 1 and got.is_contiguous(memory_format=cl)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    # out in x's storage (the kernel reads x while it writes out): copied in after
    cpu_out_kernel.clear()
    xs = torch.randn(1, 8, 3, 5, generator=rng).to(memory_format=cl)
    ys = torch.randn(1, 4, 6, 10, generator=rng).to(memory_format=cl)  # y at output size
    store = torch.zeros(xs.numel() + ys.numel())
    xv = store[: xs.numel()].view(1, 3, 5, 8).permute(0, 3, 1, 2).copy_(xs)
    outv = store[xs.numel() :].view(1, 6, 10, 4).permute(0, 3, 1, 2)
    want = up_block_shortcut_reference(ys, xs, False)
    up_block_shortcut(ys, xv, False, out=outv)
    assert len(cpu_out_kernel) == 1 and cpu_out_kernel[0][1] != outv.data_ptr()
    torch.testing.assert_close(outv, want, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["pixel_shuffle", "interpolate"])
@pytest.mark.parametrize("band_bytes", [0, 4 * 8 * 6 * 4 * 3])
def test_up_blocks_hand_bias_and_rows_to_the_out_kernel(cpu_out_kernel, mode, band_bytes):
    # Where the out kernel exists, a fused up block runs its conv without the bias and the
    # kernel adds it (banded: writing each band into the output); equal to the plain block.
    from dcgen.autoencoders.blocks import UpBlock
    from dcgen.autoencoders.fused import fused_inference
    from dcgen.autoencoders.row_bands import band_size

    torch.manual_seed(0)
    block = UpBlock(8, 8, mode, shortcut=True).eval()
    with torch.no_grad():
        block.conv.bias.normal_()
    x = torch.randn(1, 8, 12, 6).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        with fused_inference(False):
            want = block(x)
        with fused_inference(True), band_size(band_bytes):
            got = block(x)
    assert cpu_out_kernel and all(has_bias for has_bias, _ in cpu_out_kernel)
    assert len(cpu_out_kernel) == (1 if band_bytes == 0 else 4)
    if band_bytes:  # each band written in place: four distinct row offsets of one map
        assert len({ptr for _, ptr in cpu_out_kernel}) == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1"])
def test_banded_decodes_with_the_out_kernel_equal_the_plain_ones(cpu_out_kernel, preset):
    from dcgen.autoencoders import DCAE
    from dcgen.autoencoders.config import reduced_config
    from dcgen.autoencoders.fused import fused_inference
    from dcgen.autoencoders.row_bands import band_size

    torch.manual_seed(0)
    # head dim 8, as tests/autoencoders' small_config (why: dcae_helpers.TEST_HEAD_DIM)
    model = DCAE(reduced_config(preset, attention_head_dim=8)).eval()
    z = torch.randn(1, model.latent_channels, 8, 8)
    with torch.inference_mode():
        with fused_inference(False):
            want = model.decode(z)
        with fused_inference(True), band_size(48 * 3):
            got = model.decode(z)
    assert cpu_out_kernel
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ up_block_shortcut_out (CUDA)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_up_out_kernel_matches_reference(dtype, rng):
    # Every case, both main-path modes, all input layouts, with and without bias, into a
    # poisoned out in the kernel's own layout; batch-1 channels_last cases also into a row band
    # of a taller NaN-filled map, whose other rows must stay NaN.
    if not has_kernel("up_block_shortcut_out", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for up_block_shortcut_out")
    kernel = compiled_op("up_block_shortcut_out")
    atol, rtol = TOL[dtype]
    for case in UP_CASES:
        for shuffle in (True, False):
            y, x = _up_inputs(case, shuffle, dtype, rng)
            for with_bias in (False, True):
                bias = _bias_for(y, rng).cuda() if with_bias else None
                for layout, yl, xl in _layouts(y.cuda(), x.cuda()):
                    want = up_block_shortcut_reference(
                        yl.cpu().float(), xl.cpu().float(), shuffle,
                        None if bias is None else bias.cpu().float(),
                    )  # fmt: skip
                    fmt = torch.channels_last if yl.is_contiguous(
                        memory_format=torch.channels_last
                    ) and not yl.is_contiguous() else torch.contiguous_format  # fmt: skip
                    outs = []
                    poison_cuda_allocator()
                    outs.append((None, torch.empty(want.shape, dtype=dtype, device="cuda",
                                                   memory_format=fmt)))  # fmt: skip
                    if fmt == torch.channels_last and case[0] == 1:
                        outs.append(_nan_rows_band(want.shape, dtype, "cuda"))
                    for full, out in outs:
                        kernel(yl, xl, shuffle, bias, out)
                        msg = f"{layout} {case} shuffle={shuffle} bias={with_bias}"
                        assert not out.isnan().any(), f"unwritten output ({msg})"
                        torch.testing.assert_close(
                            out.cpu().float(), want, atol=atol, rtol=rtol, msg=msg
                        )
                        if full is not None:
                            h = want.shape[2]
                            assert full[:, :, :2].isnan().all(), msg
                            assert full[:, :, 2 + h :].isnan().all(), msg


@pytest.mark.cuda
def test_cuda_up_out_kernel_bit_exact_at_decoder_size(rng):
    # A stage-sized bf16 map into row bands of one channels_last output, as the banded decode
    # writes it: bit-equal to the reference (the same fp32 sum, one rounding).
    if not has_kernel("up_block_shortcut_out", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for up_block_shortcut_out")
    cl = torch.channels_last
    y, x = _up_inputs((1, 64, 96, 80, 32), True, torch.bfloat16, rng)
    y, x = y.cuda().to(memory_format=cl), x.cuda().to(memory_format=cl)
    bias = _bias_for(y, rng).cuda()
    want = up_block_shortcut_reference(y, x, True, bias)
    out = torch.full_like(want, float("nan"), memory_format=cl)
    for a in range(0, 96, 40):
        b = min(a + 40, 96)
        up_block_shortcut(y[:, :, a:b], x[:, :, a:b], True, bias=bias, out=out[:, :, 2 * a : 2 * b])
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_up_out_kernel_rejects_overlap_and_passes_opcheck(rng):
    if not has_kernel("up_block_shortcut_out", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for up_block_shortcut_out")
    op = torch.ops.dcgen.up_block_shortcut_out.default
    x = torch.randn(1, 4, 3, 3, device="cuda")
    y_full = torch.randn(1, 4, 6, 6, device="cuda")  # without shuffle: the output's shape
    with pytest.raises(RuntimeError, match="unsupported operation"):
        op(y_full, x, False, None, y_full)  # out is y
    y = torch.randn(1, 16, 3, 3, device="cuda")
    out = torch.empty(1, 4, 6, 6, device="cuda")
    bias = torch.randn(16, device="cuda")
    torch.library.opcheck(
        op, (y, x, True, bias, out), test_utils=("test_schema", "test_faketensor")
    )
