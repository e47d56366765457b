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
from tests.conftest import misaligned_copy, poison_cuda_allocator

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
