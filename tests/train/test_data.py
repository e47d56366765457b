"""ImageCaptionFolder, aspect buckets and the bucket batch sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen.train import (
    Bucket,
    BucketBatchSampler,
    DataError,
    ImageCaptionDataset,
    ImageCaptionFolder,
    assign_buckets,
    collate_samples,
    make_buckets,
    nearest_bucket,
)

# ------------------------------------------------------------------------------------ folder


def test_folder_order_captions_and_tensors(make_folder):
    root = make_folder()
    ds = ImageCaptionFolder(root, resolution=32)
    assert isinstance(ds, ImageCaptionDataset)
    assert ds.keys == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    s = ds[1]
    assert s["key"] == "b.png" and s["caption"] == "a photo of b"
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert -1.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["image"].min() < -0.9 and s["image"].max() > 0.9  # full range used, not [0, 1]
    # Same folder, same order and pixels: indices are stable.
    again = ImageCaptionFolder(root, resolution=32)
    assert torch.equal(again[3]["image"], ds[3]["image"])
    assert ds.fingerprint() == again.fingerprint()


def test_resize_crop_keeps_centre(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    # 32x96: left/right thirds black, centre white -> centre crop to 32x32 is all white.
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 255
    Image.fromarray(arr).save(root / "x.png")
    (root / "x.txt").write_text("x")
    img = ImageCaptionFolder(root, resolution=32)[0]["image"]
    assert torch.allclose(img, torch.ones_like(img))
    img = ImageCaptionFolder(root, resolution=(16, 48))[0]["image"]
    assert img.shape == (3, 16, 48)


def test_metadata_jsonl_and_precedence(make_folder):
    root = make_folder(captions="none")
    (root / "a.txt").write_text("from txt")
    rows = [{"file_name": f"{s}.png", "text": f"meta {s}"} for s in "abcde"]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = ImageCaptionFolder(root, resolution=32)
    assert ds.captions == [f"meta {s}" for s in "abcde"]  # metadata wins over a sibling .txt


def test_captions_jsonl_subfolders(tmp_path, make_folder):
    root = make_folder(captions="none")
    (root / "sub").mkdir()
    (root / "a.png").rename(root / "sub" / "a.png")
    rows = [{"file_name": "sub/a.png", "text": "nested"}] + [
        {"file_name": f"{s}.png", "text": s} for s in "bcde"
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = ImageCaptionFolder(root, resolution=32)
    assert ds.keys[-1] == "sub/a.png" and ds.captions[-1] == "nested"


def test_metadata_matches_names_in_either_unicode_form(make_folder):
    # macOS file systems (and zips made there) store names decomposed, metadata files are
    # usually written composed: "größe é.png" had no caption though the names look alike
    import unicodedata

    root = make_folder(captions="none")
    name = "größe é.png"
    (root / "a.png").rename(root / unicodedata.normalize("NFD", name))
    (root / "b.png").rename(root / "café.png")  # composed on disk, decomposed in the file
    rows = [
        {"file_name": unicodedata.normalize("NFC", name), "text": "composed"},
        {"file_name": unicodedata.normalize("NFD", "café.png"), "text": "decomposed"},
    ]
    rows += [{"file_name": f"{s}.png", "text": s} for s in "cde"]  # fmt: skip
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = ImageCaptionFolder(root, resolution=32)
    got = {unicodedata.normalize("NFC", k): c for k, c in zip(ds.keys, ds.captions, strict=True)}
    assert got[name] == "composed" and got["café.png"] == "decomposed"


def test_bad_metadata_line_names_file(make_folder):
    root = make_folder()
    (root / "metadata.jsonl").write_text('{"file_name": "a.png"}\nnot json\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:1"):
        ImageCaptionFolder(root, resolution=32)


def test_buckets_assign_by_aspect(make_folder):
    root = make_folder()
    buckets = make_buckets(64 * 64, factor=16)
    ds = ImageCaptionFolder(root, buckets=buckets, factor=16)
    shapes = {s["key"]: tuple(s["image"].shape[1:]) for s in (ds[i] for i in range(len(ds)))}
    assert shapes["a.png"] == (64, 64)
    assert shapes["b.png"][1] > shapes["b.png"][0]  # wide stays wide
    assert shapes["d.png"][0] > shapes["d.png"][1]  # tall stays tall
    assert shapes["b.png"] == shapes["e.png"]  # both 1:2 -> same bucket
    assert ds.bucket_ids == [shapes[k] for k in ds.keys]
    for h, w in shapes.values():
        assert h % 16 == 0 and w % 16 == 0 and h * w <= 64 * 64


def test_native_size_needs_divisible_images(make_folder):
    ds = ImageCaptionFolder(make_folder(images=[("a", 64, 32)]), factor=16)
    assert ds[0]["image"].shape == (3, 64, 32)
    with pytest.raises(DataError, match=r"e\.png size 40x80 is not divisible by 16"):
        ImageCaptionFolder(make_folder(name="other"), factor=16)


def test_rgba_composited_on_white(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(root / "t.png")
    (root / "t.txt").write_text("t")
    img = ImageCaptionFolder(root, resolution=16)[0]["image"]
    assert torch.allclose(img, torch.ones_like(img))


def test_jpg_and_webp(make_folder):
    for ext in (".jpg", ".webp"):
        ds = ImageCaptionFolder(make_folder(ext=ext, name=ext[1:]), resolution=32)
        assert ds.keys[0] == f"a{ext}" and ds[0]["image"].shape == (3, 32, 32)


def test_error_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="no images"):
        ImageCaptionFolder(tmp_path / "empty", resolution=32)
    with pytest.raises(DataError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "missing", resolution=32)


def test_error_missing_caption_names_file(make_folder):
    root = make_folder()
    (root / "c.txt").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\).*no caption.*c\.png"):
        ImageCaptionFolder(root, resolution=32)
    assert ImageCaptionFolder(root, resolution=32, missing_caption="empty").captions[2] == ""
    assert "c.png" not in ImageCaptionFolder(root, resolution=32, missing_caption="skip").keys


def test_error_unreadable_image_names_file(make_folder):
    root = make_folder()
    (root / "b.png").write_bytes(b"not a png at all")
    ds = ImageCaptionFolder(root, resolution=32)  # pixels are read lazily
    assert ds[0]["key"] == "a.png"
    with pytest.raises(DataError, match=r"could not read image .*b\.png"):
        ds[1]
    # Bucketing reads headers up front, so the error comes at construction.
    with pytest.raises(DataError, match=r"could not read image .*b\.png"):
        ImageCaptionFolder(root, buckets=make_buckets(32 * 32, 16))


def test_a_decompression_bomb_names_its_file(make_folder, monkeypatch):
    # PIL's DecompressionBombError is no OSError / ValueError: it left precompute with a
    # traceback that never named the image. Stood in for by a limit below the test images.
    root = make_folder()
    ds = ImageCaptionFolder(root, resolution=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"could not read image .*a\.png: Image size"):
        ds[0]
    with pytest.raises(DataError, match=r"could not read image .*\.png: Image size"):
        ImageCaptionFolder(root, buckets=make_buckets(32 * 32, 16))


def test_error_resolution_not_divisible(make_folder):
    root = make_folder()
    with pytest.raises(DataError, match=r"resolution 40x40 is not divisible by 32"):
        ImageCaptionFolder(root, resolution=40, factor=32)
    with pytest.raises(DataError, match=r"bucket 48x48 is not divisible by 32"):
        ImageCaptionFolder(root, buckets=[Bucket(48, 48)], factor=32)


def test_collate_rejects_mixed_shapes():
    a = {"image": torch.zeros(3, 16, 16), "caption": "a", "key": "a"}
    b = {"image": torch.zeros(3, 16, 32), "caption": "b", "key": "b"}
    batch = collate_samples([a, a])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["caption"] == ["a", "a"]
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate_samples([a, b])


# ----------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("factor", [16, 32, 64])
def test_make_buckets_divisible_within_area(factor):
    area = 512 * 512
    buckets = make_buckets(area, factor, max_aspect=3.0)
    assert Bucket(512, 512) in buckets
    for b in buckets:
        assert b.height % factor == 0 and b.width % factor == 0
        assert b.area <= area and max(b.aspect, 1 / b.aspect) <= 3.0
        # Maximal: growing either side by one grid step breaks the budget.
        assert (b.height + factor) * b.width > area and b.height * (b.width + factor) > area
    assert buckets == sorted(buckets, key=lambda b: b.aspect)
    # Symmetric: every landscape bucket has its portrait twin.
    assert {(b.width, b.height) for b in buckets} == {(b.height, b.width) for b in buckets}


def test_nearest_bucket():
    buckets = [Bucket(32, 32), Bucket(32, 64), Bucket(64, 32)]
    assert nearest_bucket(100, 100, buckets) == Bucket(32, 32)
    assert nearest_bucket(100, 190, buckets) == Bucket(32, 64)
    assert nearest_bucket(300, 100, buckets) == Bucket(64, 32)
    assert assign_buckets([(10, 10), (10, 30)], buckets) == [Bucket(32, 32), Bucket(32, 64)]


def _ids():
    return ["s"] * 10 + ["w"] * 7 + ["t"] * 5


def test_sampler_batches_share_a_bucket_and_cover_data():
    ids = _ids()
    sampler = BucketBatchSampler(ids, batch_size=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1  # drop_last per bucket
    for batch in batches:
        assert len(batch) == 3 and len({ids[i] for i in batch}) == 1
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    keep = BucketBatchSampler(ids, batch_size=3, seed=1, drop_last=False)
    assert sorted(i for b in keep for i in b) == list(range(len(ids)))


def test_sampler_deterministic_per_seed_and_epoch():
    ids = _ids()
    a, b = BucketBatchSampler(ids, 2, seed=5), BucketBatchSampler(ids, 2, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first  # a new shuffle each epoch
    assert list(BucketBatchSampler(ids, 2, seed=6)) != first
    assert list(a) == list(a)  # re-iterating an epoch replays it


def test_sampler_resume_from_position():
    ids = _ids()
    s = BucketBatchSampler(ids, 2, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, position=4)
    assert list(s) == full[4:]
    assert list(s) == full  # the skip applies to one iteration only
    fresh = BucketBatchSampler(ids, 2, seed=3)
    fresh.load_state_dict({"seed": 3, "epoch": 2, "position": 7})
    assert list(fresh) == full[7:]
    s.set_epoch(2, position=len(full) + 1)
    with pytest.raises(ValueError, match="past the end"):
        list(s)


def test_sampler_replicas_partition_batches():
    ids = _ids()
    ranks = [list(BucketBatchSampler(ids, 2, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    assert not {tuple(b) for b in ranks[0]} & {tuple(b) for b in ranks[1]}


def test_sampler_with_dataloader(make_folder):
    ds = ImageCaptionFolder(make_folder(), buckets=make_buckets(64 * 64, 16))
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_samples)
    batches = list(loader)
    # The squares (a, c) and the two 1:2 images (b, e) fill batches; the lone tall d is dropped.
    assert sorted(tuple(sorted(b["key"])) for b in batches) == [
        ("a.png", "c.png"),
        ("b.png", "e.png"),
    ]
    for b in batches:
        assert b["image"].shape == (2, 3, *ds.target_size(ds.keys.index(b["key"][0])))


# ------------------------------------------------------------------------------ odd inputs


def test_16_bit_greyscale_keeps_its_tones(tmp_path):
    # Pillow's own RGB conversion clips 16-bit values at 255: a gradient came out white.
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray((ramp / 257).round().astype(np.uint8)).save(tmp_path / "g8.png")
    for name in ("g16", "g8"):
        (tmp_path / f"{name}.txt").write_text("a grey ramp")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")  # what Pillow opens a 16-bit greyscale PNG as
    ds = ImageCaptionFolder(tmp_path, resolution=32)
    g16, g8 = ds[0]["image"], ds[1]["image"]
    assert ds.keys == ["g16.png", "g8.png"]
    torch.testing.assert_close(g16, g8, rtol=0, atol=1 / 127.5)  # one 8-bit step
    assert g16[:, :, 16].mean() < 0.1  # the middle is grey, not white


def test_a_colour_key_is_transparent_like_an_alpha_channel(tmp_path):
    img = Image.new("RGB", (16, 16), (10, 20, 30))
    img.paste((200, 0, 0), (0, 0, 8, 16))
    img.save(tmp_path / "key.png", transparency=(10, 20, 30))  # tRNS: this colour is clear
    from dcgen.train.data import pil_to_tensor

    with Image.open(tmp_path / "key.png") as im:
        x = pil_to_tensor(im)
    torch.testing.assert_close(x[:, :, 12], torch.ones(3, 16))  # keyed pixels: white
    assert x[0, 0, 0] > 0.5 and x[1, 0, 0] < -0.9  # the red half stays red


def test_caption_files_with_a_byte_order_mark_and_bad_encodings(make_folder):
    root = make_folder(images=[("a", 32, 32), ("b", 32, 32)])
    (root / "a.txt").write_bytes("\ufeffa red car\n".encode())  # "UTF-8 with BOM"
    assert ImageCaptionFolder(root, resolution=32).captions[0] == "a red car"
    (root / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"b\.txt: expected UTF-8 text"):
        ImageCaptionFolder(root, resolution=32)
    (root / "b.txt").write_text("fine")
    (root / "metadata.jsonl").write_bytes(
        b'{"file_name": "a.png", "text": "caf\xe9"}\n'  # latin-1, not UTF-8
    )
    with pytest.raises(DataError, match=r"metadata\.jsonl: expected UTF-8 text"):
        ImageCaptionFolder(root, resolution=32)


def test_symlinked_folders_are_followed_once(make_folder, tmp_path):
    root = make_folder(images=[("a", 32, 32)])
    elsewhere = make_folder(images=[("b", 32, 32), ("c", 32, 32)], name="other_disk")
    (root / "part2").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(root, target_is_directory=True)  # a link cycle
    ds = ImageCaptionFolder(root, resolution=32)
    assert ds.keys == ["a.png", "part2/b.png", "part2/c.png"]
    assert ds.captions[1] == "a photo of b"


def test_the_crop_is_resampled_from_the_source_box_only(monkeypatch):
    # A 3000 x 1 strip cropped to 64 x 64: only the centred 1 x 1 box is resampled, to 64 x 64,
    # instead of the whole strip to 192,000 x 64 first (memory grew with the square of the
    # resolution).
    from dcgen.train.data import resize_center_crop

    calls = []
    real = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        calls.append(tuple(size))
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    strip = Image.fromarray(np.arange(3000, dtype=np.uint8)[None, :].repeat(1, 0))
    out = resize_center_crop(strip, (64, 64))
    assert out.size == (64, 64) and calls == [(64, 64)]
    assert np.asarray(out).std() < 1  # one source pixel's value, spread
    assert abs(float(np.asarray(out).mean()) - 1500 % 256) <= 1  # from the centre of the strip


@pytest.mark.parametrize(
    ("w", "h", "size"), [(90, 40, (32, 32)), (40, 90, (32, 48)), (7, 5, (32, 32))]
)
def test_the_crop_is_centred(w, h, size):
    # an image symmetric about its centre gives a symmetric crop
    from dcgen.train.data import resize_center_crop

    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (h, (w + 1) // 2, 3), dtype=np.uint8)
    arr = np.concatenate([half, half[:, ::-1][:, w % 2 :]], axis=1)
    arr = np.concatenate([arr, arr[::-1]], axis=0)  # symmetric top / bottom too
    out = np.asarray(resize_center_crop(Image.fromarray(arr), size)).astype(int)
    assert out.shape == (*size, 3)
    assert np.abs(out - out[:, ::-1]).max() <= 1 and np.abs(out - out[::-1]).max() <= 1


def test_png_headers_are_read_without_decoding_and_late_exif_is_found(tmp_path, monkeypatch):
    import zlib

    from PIL import PngImagePlugin

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    # b.png: the same picture with an EXIF orientation of 6 (rotate 90) in an eXIf chunk after
    # the pixel data, where Pillow only finds it by decoding the image
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()
    chunk = len(payload).to_bytes(4, "big") + b"eXIf" + payload
    chunk += zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
    raw = (tmp_path / "a.png").read_bytes()
    end = raw.rindex(b"IEND") - 4
    (tmp_path / "b.png").write_bytes(raw[:end] + chunk + raw[end:])
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("noise")
    loads = []
    real = PngImagePlugin.PngImageFile.load

    def counting(self, *args, **kwargs):
        loads.append(self.filename)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting)
    ds = ImageCaptionFolder(tmp_path, buckets=[Bucket(32, 64), Bucket(64, 32)], factor=16)
    assert ds.sizes == [(32, 64), (64, 32)]  # b is displayed rotated
    assert [Path(f).name for f in loads] == ["b.png"]  # only the late-EXIF file was decoded


def test_bucket_assignment_searches_once_per_distinct_size(monkeypatch):
    import dcgen.train.buckets as buckets_mod

    buckets = make_buckets(64 * 64, 32)
    sizes = [(10, 10), (10, 30), (10, 10), (30, 10), (10, 30)] * 200
    want = [buckets_mod.nearest_bucket(h, w, buckets) for h, w in sizes]
    calls = []
    real = buckets_mod.nearest_bucket
    monkeypatch.setattr(buckets_mod, "nearest_bucket", lambda *a: calls.append(a) or real(*a))
    assert assign_buckets(sizes, buckets) == want
    assert len(calls) == 3  # (10, 10), (10, 30), (30, 10)
