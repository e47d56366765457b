"""Row bands (dcgen/autoencoders/row_bands.py): the fused path's result, in less memory.

On a CPU the fused path is forced (fused_inference(True)) and the ops run their references;
bands are made tiny (band_size) so that small test maps split into many of them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dcae_helpers import peak_cpu_bytes, perturb_norms, small_config, well_conditioned_latent
from torch import nn

from dcgen.autoencoders import DCAE
from dcgen.autoencoders.blocks import ResBlock, UpBlock
from dcgen.autoencoders.fused import fused_inference
from dcgen.autoencoders.row_bands import (
    band_bytes,
    band_size,
    conv3x3_rows,
    may_overwrite,
    owned_activations,
    row_bands,
)
from dcgen.ops import has_kernel
from tests.conftest import benchmark_script, poison_cuda_allocator

PRESETS = ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1", "dc-ae-f32c32-in-1.0"]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv3x3_rows_equals_rows_of_the_full_conv(channels_last, with_bias):
    weight = torch.randn(5, 4, 3, 3)
    bias = torch.randn(5) if with_bias else None
    for height in (1, 2, 5, 9):
        x = torch.randn(2, 4, height, 6)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        full = F.conv2d(x, weight, bias, padding=1)
        for a in range(height):
            for b in range(a + 1, height + 1):
                got = conv3x3_rows(x, weight, bias, a, b)
                torch.testing.assert_close(got, full[:, :, a:b], rtol=1e-5, atol=1e-5)


def test_row_bands_cover_every_row_once_within_the_size():
    x = torch.empty(2, 4, 10, 3)  # fp32: one row of one sample is 4 * 3 * 4 = 48 bytes
    with band_size(48 * 3):
        bands = row_bands(x, 48)
    assert bands is not None
    for i in range(2):
        rows = [r for j, a, b in bands if j == i for r in range(a, b)]
        assert rows == list(range(10))
    assert all(b - a <= 3 for _, a, b in bands)
    with band_size(48 * 20):  # the whole tensor fits one band: the caller's unbanded path
        assert row_bands(x, 48) is None
    with band_size(0):  # banding off
        assert row_bands(x, 48) is None
    with band_size(1):  # a band never has less than one row
        assert len(row_bands(x, 48)) == 20


def test_band_size_settings_and_errors(monkeypatch):
    monkeypatch.delenv("DCGEN_DCAE_BAND_MB", raising=False)
    assert band_bytes() == 256 * 2**20
    monkeypatch.setenv("DCGEN_DCAE_BAND_MB", "64")
    assert band_bytes() == 64 * 2**20
    with band_size(1000):
        assert band_bytes() == 1000
    assert band_bytes() == 64 * 2**20
    monkeypatch.setenv("DCGEN_DCAE_BAND_MB", "lots")
    with pytest.raises(ValueError, match="DCGEN_DCAE_BAND_MB: expected a number of MiB"):
        band_bytes()
    for raw in ("-1", "nan", "inf", "1e400"):  # nan / inf were a bare int() conversion error
        monkeypatch.setenv("DCGEN_DCAE_BAND_MB", raw)
        with pytest.raises(ValueError, match="DCGEN_DCAE_BAND_MB: expected a finite number >= 0"):
            band_bytes()
    for bad in (-1, 2.5, True, "64"):
        with pytest.raises(ValueError, match="band_size: expected a byte count"):
            with band_size(bad):
                pass


def _resblock(norm: str) -> ResBlock:
    block = ResBlock(8, "batch_norm" if norm in ("batch_norm", "folded") else "rms_norm", "silu")
    perturb_norms(block).eval()
    if norm == "folded":
        block.fold_batchnorm()  # norm becomes nn.Identity
    return block


def _map(batch: int = 2, channels: int = 8, height: int = 11, width: int = 6) -> torch.Tensor:
    return torch.randn(batch, channels, height, width)


@pytest.mark.parametrize("norm", ["batch_norm", "rms_norm", "folded"])
def test_resblock_bands_write_the_fused_result_into_the_input(norm):
    block = _resblock(norm)
    x = _map()
    with torch.no_grad(), fused_inference(True):
        with band_size(0), owned_activations():
            expected = block(x.clone())  # the unbanded fused path
        plain = None
        with fused_inference(False):
            plain = block(x.clone())
        owned = x.clone()
        with band_size(8 * 6 * 4 * 2), owned_activations():  # 2-row bands
            got = block(owned)
    assert got is owned  # written in place: no third map
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)


def test_resblock_keeps_its_input_unless_the_caller_owns_it():
    block = _resblock("rms_norm")
    x = _map()
    before = x.clone()
    with torch.no_grad(), fused_inference(True), band_size(1):
        out = block(x)  # no owned_activations(): a direct call
        assert out is not x
        torch.testing.assert_close(x, before, rtol=0, atol=0)
        with owned_activations():
            view = x[:, :, 1:]  # a view: its storage belongs to x
            block(view)
            torch.testing.assert_close(x, before, rtol=0, atol=0)
            seen = []
            handle = block.register_forward_hook(lambda m, args, o: seen.append(args[0]))
            hooked = block(x)  # a hook may keep the input: not overwritten
            handle.remove()
            assert hooked is not x and seen[0] is x
            torch.testing.assert_close(x, before, rtol=0, atol=0)
    with torch.enable_grad(), owned_activations():
        assert not may_overwrite(block, x)  # autograd may need the input


@pytest.mark.parametrize("mode", ["pixel_shuffle", "interpolate"])
def test_up_block_bands_equal_the_unbanded_fused_path(mode):
    block = UpBlock(8, 4, mode, True).eval()
    x = _map(height=7)
    before = x.clone()
    with torch.no_grad(), fused_inference(True):
        with band_size(0):
            expected = block(x)
        with band_size(16 * 6 * 4 * 3):  # 3 input rows per band
            got = block(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the input is only read
    assert got.shape == expected.shape == (2, 4, 14, 12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_decode_and_encode_with_bands_equal_the_plain_path(name):
    """Batch 2, non-square, bands of a few rows: the same images and latents as the plain path
    (which the fused path matches, test_dcae_fused_path.py)."""
    model = perturb_norms(DCAE(small_config(name))).eval()
    f = model.spatial_compression_ratio
    z = torch.randn(2, model.latent_channels, 3, 2)
    images = torch.rand(2, 3, 2 * f, 3 * f) * 2 - 1
    with torch.no_grad():
        plain = model.decode(z)
        plain_z = model.encode(images)
        with fused_inference(True), band_size(512):
            banded = model.decode(z)
            banded_z = model.encode(images)
            band_free = model.decode(z, band_rows=f)  # banding.py's decode: no row bands inside
    torch.testing.assert_close(banded, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(banded_z, plain_z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(band_free, plain, rtol=1e-4, atol=1e-4)


def _decode_then_unhook(model: DCAE, z: torch.Tensor, handles: list) -> torch.Tensor:
    try:
        return model.decode(z)
    finally:
        for h in handles:
            h.remove()


def test_stage_hooks_fire_and_see_their_input_unchanged():
    """The decoder runs its blocks one by one; a stage with a forward hook runs through its own
    call instead, with no block overwriting the input the hook is given."""
    cfg = small_config("dc-ae-f32c32-in-1.0")
    # All ResBlocks: the deepest stage (the first to run) has no up block, so its first layer is
    # a ResBlock that, unhooked, would write into the stage's input.
    cfg = cfg.replace(decoder_block_types=("ResBlock",) * cfg.num_stages)
    model = perturb_norms(DCAE(cfg)).eval()
    z = torch.randn(1, model.latent_channels, 3, 3)
    stage = model.decoder.stages[-1]
    assert isinstance(stage[0], ResBlock)
    before, after = [], []
    with torch.no_grad(), fused_inference(True), band_size(512):
        expected = model.decode(z)
        handles = [
            stage.register_forward_pre_hook(lambda m, args: before.append(args[0].clone())),
            stage.register_forward_hook(lambda m, args, out: after.append(args[0])),
        ]
        got = _decode_then_unhook(model, z, handles)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(before) == len(after) == 1
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)  # not overwritten


@pytest.mark.parametrize("preset", ["dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.1"])
def test_layer_hooks_keep_what_they_were_given(preset):
    """Forward hooks on decoder layers (and on a ResBlock's first conv and an up block's conv)
    keep their inputs and outputs: on the in-place path no later layer may write into a tensor
    a hook was given, the up block's fused form must not bypass a hooked conv, and the decode
    is unchanged."""
    model = perturb_norms(DCAE(small_config(preset))).eval()
    z = torch.randn(1, model.latent_channels, 3, 3)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, tensor, copy at hook time)

    def keep(name):  # noqa: ANN001, ANN202
        def hook(m, args, out):  # noqa: ANN001, ANN202
            for t in (args[0], out):
                seen.append((name, t, t.clone()))

        return hook

    layers = [
        (f"{i}.{j}", m) for i, st in enumerate(model.decoder.stages) for j, m in enumerate(st)
    ]
    res = next(m for _, m in layers if isinstance(m, ResBlock))
    ups = [m for _, m in layers if isinstance(m, UpBlock) and m.shortcut]
    with torch.no_grad(), fused_inference(True), band_size(512):
        expected = model.decode(z)
        handles = [m.register_forward_hook(keep(n)) for n, m in layers]
        handles.append(res.conv1.register_forward_hook(keep("res.conv1")))
        handles += [u.conv.register_forward_hook(keep("up.conv")) for u in ups]
        handles.append(model.decoder.head_norm.register_forward_hook(keep("head_norm")))
        got = _decode_then_unhook(model, z, handles)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    names = {n for n, _, _ in seen}
    assert {"res.conv1", "head_norm"} <= names and (not ups or "up.conv" in names)
    for name, t, copy in seen:
        torch.testing.assert_close(t, copy, rtol=0, atol=0, msg=f"{name}: overwritten")


def test_row_bands_lower_the_measured_peak_memory():
    """Measured on this CPU (fp32, forced fused path, 512 px, widths / 16, SANA 1.1): 37.7 MB
    without bands, 16.9 MB with 64 KiB bands (2026-11-27)."""
    model = perturb_norms(DCAE(small_config("dc-ae-f32c32-sana-1.1"))).eval()
    z = torch.randn(1, model.latent_channels, 16, 16)
    with torch.inference_mode(), fused_inference(True):
        with band_size(0):
            full = peak_cpu_bytes(lambda: model.decode(z))
        with band_size(64 * 1024):
            banded = peak_cpu_bytes(lambda: model.decode(z))
    assert banded < 0.6 * full, (banded, full)


@pytest.mark.parametrize(
    "preset, largest_map",
    [
        ("dc-ae-f64c128-in-1.0", 2048 * 2048 * 256 * 2),  # stage 1: 256 ch at 2048^2, bf16
        ("dc-ae-f32c32-sana-1.1", 4096 * 4096 * 128 * 2),  # stage 0: 128 ch at 4096^2
    ],
)
def test_4k_decode_plan_holds_two_full_maps_instead_of_three(preset, largest_map):
    """The 4096^2 decode's activation plan, on the meta device (benchmarks/dcae_peak_model.py):
    without row bands a ResBlock holds three maps of its stage (input, conv1 and conv2
    outputs); with them two, plus a few bands. The issue's budgets follow: f64c128 <= 6 GB,
    SANA < 13 GB (scratch space of cuDNN not counted)."""
    model = benchmark_script("dcae_peak_model")
    band = 256 * 2**20
    off = model.predicted_decode_peak(preset, 4096, band_mb=0)["peak_bytes"]
    on = model.predicted_decode_peak(preset, 4096, band_mb=band / 2**20)["peak_bytes"]
    assert 2.9 * largest_map <= off <= 3.1 * largest_map, off / largest_map
    assert on <= 2 * largest_map + 4 * band, (on - 2 * largest_map) / band
    assert on < (6e9 if "f64c128" in preset else 13e9)


def test_peak_model_counts_live_tensors():
    mode = benchmark_script("dcae_peak_model").LiveBytes()
    with mode:
        a = torch.empty(1000, dtype=torch.float32)
        b = a[10:]  # a view: no new storage
        c = torch.empty(500, dtype=torch.float32)
        del a, c
        d = torch.empty(100, dtype=torch.float32)
    assert mode.peak == 6000  # a and c together
    assert mode.live == 4400  # a (through its view b) and d
    del b, d


def test_owned_activations_stays_in_its_thread():
    """A decode's owned_activations in one thread does not let a block called directly in
    another thread overwrite that caller's input."""
    import threading

    block = _resblock("rms_norm")
    x = _map()
    before = x.clone()
    inside, done = threading.Event(), threading.Event()

    def decode_like():  # holds the context while the other thread calls the block
        with owned_activations():
            inside.set()
            done.wait(timeout=30)

    t = threading.Thread(target=decode_like)
    t.start()
    try:
        assert inside.wait(timeout=30)
        with torch.no_grad(), fused_inference(True), band_size(1):
            out = block(x)
    finally:
        done.set()
        t.join()
    assert out is not x
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_owned_activations_is_scoped():
    block = nn.Conv2d(1, 1, 1)
    x = torch.randn(1, 1, 2, 2)
    with torch.no_grad():
        assert not may_overwrite(block, x)
        with owned_activations():
            assert may_overwrite(block, x)
            with owned_activations(False):
                assert not may_overwrite(block, x)
            assert may_overwrite(block, x)
        assert not may_overwrite(block, x)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1"])
def test_cuda_decode_with_row_bands_equals_it_without(name, monkeypatch):
    """The automatic rule on a GPU (kernels, channels_last): bands of a few rows give the
    unbanded fused decode in fp32 without TF32; poisoned memory shows any output band that was
    never written. In bf16, cuDNN may sum a band's convs in another order than the full map's
    (other algorithms for other shapes), and a random model amplifies one-ulp differences
    (measured on the CPU by reordering the banded sums: up to 8e-2 relative max error in 3 of
    6 seeds), so bf16 is judged as the fused path's own test judges it: the banded decode about
    as close to the fp32 result as the unbanded one."""
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernels for the fused DC-AE path")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = perturb_norms(DCAE(small_config(name))).eval().cuda()
    f = model.spatial_compression_ratio
    z = well_conditioned_latent(model, (2, model.latent_channels, 5, 3), "cuda")
    bands = 4 * 16 * 4 * f  # a few rows per band at every stage

    def decode(dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        model.to(dtype)
        poison_cuda_allocator()
        with band_size(nbytes):
            out = model.decode(z.to(dtype)).float()
        assert torch.isfinite(out).all(), (dtype, nbytes)
        return out

    with torch.inference_mode():
        ref, got32 = decode(torch.float32, 0), decode(torch.float32, bands)
        scale = max(1.0, ref.abs().max().item())
        assert (got32 - ref).abs().max().item() <= 1e-4 * scale
        full16, got16 = decode(torch.bfloat16, 0), decode(torch.bfloat16, bands)
    rms = lambda a: float((a - ref).pow(2).mean().sqrt())  # noqa: E731
    assert rms(got16) <= 1.5 * rms(full16) + 1e-3 * scale, (rms(got16), rms(full16))


@pytest.mark.cuda
@pytest.mark.parametrize("fold", [False, True], ids=["bn", "folded"])
@pytest.mark.parametrize("name", ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1"])
def test_cuda_band_paths_in_both_layouts_encode_and_band_rows(name, fold, monkeypatch):
    """The banded CUDA paths no other test reaches: the NCHW layout (set_memory_format
    "contiguous": the norm kernel's copy of NCHW band views, the up-block kernel on strided
    views), encode (the fused down blocks, ResBlocks writing into the stem output), an explicit
    fold_batchnorm(), decode(band_rows=...) with row bands inside and encode(band_rows=...)
    (strided row-band views into the fused encoder blocks). fp32 (no TF32) equals
    the unbanded run; bf16 is judged by RMS against that fp32 result, as the unbanded bf16
    run is."""
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernels for the fused DC-AE path")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = perturb_norms(DCAE(small_config(name))).eval().cuda()
    if fold:
        model.fold_batchnorm()
    f = model.spatial_compression_ratio
    z = torch.randn(2, model.latent_channels, 5, 3, device="cuda")
    img = torch.rand(2, 3, 5 * f, 3 * f, device="cuda") * 2 - 1
    bands = 4 * 16 * 4 * f
    ref: dict[tuple[str, str], torch.Tensor] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        for fmt in ("channels_last", "contiguous"):
            model.set_memory_format(fmt)
            zz, xx = z.to(dtype), img.to(dtype)
            with torch.inference_mode():
                with band_size(0):
                    full = {"decode": model.decode(zz).float(), "encode": model.encode(xx).float()}
                poison_cuda_allocator()
                with band_size(bands):
                    got = {
                        "decode": model.decode(zz).float(),
                        "encode": model.encode(xx).float(),
                        "band_rows": model.decode(zz, band_rows=f + 3).float(),
                        "encode_band_rows": model.encode(xx, band_rows=f + 6).float(),
                    }
            full["band_rows"] = full["decode"]
            full["encode_band_rows"] = full["encode"]
            for what, out in got.items():
                case = (dtype, fmt, what)
                assert torch.isfinite(out).all(), case
                if dtype == torch.float32:
                    ref[fmt, what] = full[what]
                    scale = max(1.0, full[what].abs().max().item())
                    assert (out - full[what]).abs().max().item() <= 1e-4 * scale, case
                else:
                    r = ref[fmt, what]
                    rms = lambda a, r=r: float((a - r).pow(2).mean().sqrt())  # noqa: E731
                    bound = 1.5 * rms(full[what]) + 1e-3 * max(1.0, r.abs().max().item())
                    assert rms(out) <= bound, (*case, rms(out), rms(full[what]))
