"""SA-1B data: RLE decoding at target resolution, shards round trip, training samples, bad input."""

import json
import tarfile
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from pycocotools import mask as mask_utils
from torch.nn import functional as F

from segany_train.data.pipeline import SkippedSampleWarning, collate_sam_samples, expand_shard_patterns, sam_sample_pipeline
from segany_train.data.rle import decode_rle_at, nearest_indices, rle_counts
from segany_train.data.sa1b import BadSample, decode_sample, sample_key
from segany_train.data.sam_sample import SamSampleConfig, build_sam_sample
from segany_train.data.shard_writer import SA1BShardWriter, read_manifest
from segany_train.model.transforms import ResizeLongestSide
from tests.shards import jpeg_bytes, make_image, record_for, release_record, write_release_tars, write_shards

SMALL = SamSampleConfig(image_size=128, mask_size=32)


def _random_mask(rng, h, w):
    kind = rng.integers(0, 4)
    if kind == 0:
        return np.zeros((h, w), bool)
    if kind == 1:
        return rng.random((h, w)) < 0.5
    mask = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 5)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        mask[y : y + rng.integers(1, 60), x : x + rng.integers(1, 60)] = True
    return mask


def _full_decode_then_nearest(rle, th, tw):
    full = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    return F.interpolate(torch.from_numpy(full)[None, None].float(), size=(th, tw), mode="nearest")[0, 0].bool().numpy()


def test_rle_decoding_at_target_size_equals_full_decode_then_nearest_resize():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        th, tw = (int(v) for v in rng.integers(1, 150, 2))
        coco = mask_utils.encode(np.asfortranarray(_random_mask(rng, h, w).astype(np.uint8)))
        rle = {"size": coco["size"], "counts": coco["counts"].decode()}
        expected = _full_decode_then_nearest(rle, th, tw)
        rows, cols = nearest_indices(h, th), nearest_indices(w, tw)
        assert np.array_equal(decode_rle_at(rle, rows, cols), expected)
        # run lengths agree with pycocotools' own area
        assert rle_counts(rle["counts"])[1::2].sum() == mask_utils.area(coco)


@pytest.mark.parametrize("number", [int, float])
def test_sa1b_bboxes_do_not_cut_off_the_last_row_and_column(number):
    # SA-1B's bbox width and height are one less than the RLE's extent; the RLE is the truth
    image, masks = make_image(3, height=48, width=64, num_masks=6)
    record = release_record(3, image, masks)
    for ann in record["annotations"]:
        ann["bbox"] = [number(v) for v in ann["bbox"]]
    cfg = SamSampleConfig(image_size=64, mask_size=64)  # the loss resolution is the image's: every pixel is sampled
    sample = build_sam_sample("sa_3", jpeg_bytes(image), record, cfg, np.random.default_rng(0))
    assert len(sample["annotation_ids"]) == len(masks)
    for decoded, annotation_id in zip(sample["masks"].numpy(), sample["annotation_ids"].tolist()):
        assert np.array_equal(decoded[:48], masks[annotation_id - 300]), annotation_id


@pytest.mark.parametrize("counts,message", [("0 1", "alphabet"), ("`", "middle"), ("3", "cover")])
def test_malformed_rle_is_refused(counts, message):
    with pytest.raises(ValueError, match=message):
        decode_rle_at({"size": [2, 2], "counts": counts}, np.arange(2), np.arange(2))


def test_shards_round_trip_with_manifest(tmp_path):
    paths = write_shards(tmp_path, num_images=7, per_shard=3)
    assert [p.name for p in paths] == ["sa_000000.tar", "sa_000001.tar", "sa_000002.tar"]
    manifest = read_manifest(tmp_path)
    assert {k: v["samples"] for k, v in manifest["shards"].items()} == {p.name: n for p, n in zip(paths, (3, 3, 1))}
    assert manifest["total_samples"] == 7 and not list(tmp_path.glob("*.tmp"))
    seen = []
    for raw in wds.WebDataset([str(p) for p in paths], shardshuffle=False):
        key, jpeg, record = decode_sample(raw)
        image_id = int(key.split("_")[1])
        image, masks = make_image(image_id)
        assert record == json.loads(json.dumps(record_for(image_id, image, masks)))
        assert jpeg == jpeg_bytes(image)
        seen.append(key)
    assert seen == [sample_key(i) for i in range(7)]


def test_a_failed_write_leaves_no_partial_shard(tmp_path):
    image, masks = make_image(0)
    with pytest.raises(RuntimeError):
        with SA1BShardWriter(tmp_path, max_samples_per_shard=2) as writer:
            for i in range(3):
                writer.write(sample_key(i), jpeg_bytes(image), record_for(i, image, masks))
            assert list(tmp_path.glob("sa_000001.tar.*.tmp")) and not (tmp_path / "sa_000001.tar").exists()
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "sa_000000.tar"]
    with pytest.raises(ValueError, match="dots"):
        SA1BShardWriter(tmp_path / "x").write("sa_1.5", b"", record_for(0, image, masks))


def test_training_sample_equals_full_decode_and_official_resize():
    image, masks = make_image(3, height=90, width=60, num_masks=6)
    record = record_for(3, image, masks)
    sample = build_sam_sample("sa_3", jpeg_bytes(image, quality=100), record, SMALL, np.random.default_rng(0))
    h, w = ResizeLongestSide.get_preprocess_shape(90, 60, 128)
    assert sample["input_size"] == (h, w) and sample["original_size"] == (90, 60)
    reference = ResizeLongestSide(128).apply_image(image)  # what SamPredictor feeds the model
    got = sample["image"][:, :h, :w].permute(1, 2, 0).numpy().astype(float)
    assert np.abs(got - reference).mean() < 6  # JPEG + reduced-scale decode, same geometry
    assert (sample["image"][:, h:, :] == 0).all() and (sample["image"][:, :, w:] == 0).all()
    mh, mw = ResizeLongestSide.get_preprocess_shape(90, 60, 32)
    expected = [_full_decode_then_nearest(a["segmentation"], mh, mw) for a in record["annotations"]]
    expected = [e for e in expected if e.any()]
    assert sample["masks"].shape[0] == len(expected)
    for got_mask, exp in zip(sample["masks"], expected):
        assert np.array_equal(got_mask[:mh, :mw].numpy(), exp) and not got_mask[mh:].any() and not got_mask[:, mw:].any()
    # boxes enclose their masks exactly (mask frame x4)
    for box, mask in zip(sample["boxes"], sample["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min() * 4, ys.min() * 4, (xs.max() + 1) * 4, (ys.max() + 1) * 4]


def test_mask_sampling_and_area_filter():
    image, masks = make_image(1, num_masks=8)
    masks[0] = np.ones_like(masks[0])  # covers 100% of the image: dropped
    record = record_for(1, image, masks)
    cfg = SamSampleConfig(image_size=128, mask_size=32, max_masks=3)
    ids = set()
    for seed in range(10):
        sample = build_sam_sample("sa_1", jpeg_bytes(image), record, cfg, np.random.default_rng(seed))
        assert 1 <= sample["masks"].shape[0] <= 3 and 100 not in sample["annotation_ids"].tolist()
        ids.update(sample["annotation_ids"].tolist())
    assert len(ids) > 3  # different masks are drawn on different visits


def test_masks_below_the_minimum_size_at_the_loss_resolution_are_dropped():
    image, _ = make_image(2, height=128, width=128)
    masks = np.zeros((4, 128, 128), bool)  # the loss frame is 32x32: one low-res pixel per 4x4
    masks[0, :64, :64] = True  # 256 low-res pixels
    masks[1, :16, :16] = True  # 16
    masks[2, :8, :8] = True  # 4
    masks[3, :4, :4] = True  # 1
    record = record_for(2, image, list(masks))
    for minimum, kept in ((1, 4), (4, 3), (16, 2), (17, 1)):
        cfg = SamSampleConfig(image_size=128, mask_size=32, min_mask_pixels=minimum)
        sample = build_sam_sample("sa_2", jpeg_bytes(image), record, cfg, np.random.default_rng(0))
        assert sample["masks"].shape[0] == kept and bool((sample["masks"].flatten(1).sum(1) >= minimum).all())
    with pytest.raises(BadSample, match="300\\+ pixels"):
        cfg = SamSampleConfig(image_size=128, mask_size=32, min_mask_pixels=300)
        build_sam_sample("sa_2", jpeg_bytes(image), record, cfg, np.random.default_rng(0))


def test_jitter_and_flip_move_image_masks_and_boxes_together():
    """A bright square whose GT mask is the square: after any jitter/flip, image and mask still coincide."""
    image = np.zeros((100, 160, 3), np.uint8)
    mask = np.zeros((100, 160), bool)
    mask[20:70, 90:140] = True
    image[mask] = 255
    record = record_for(5, image, [mask])
    cfg = SamSampleConfig(image_size=128, mask_size=32, large_scale_jitter=True, horizontal_flip=True)
    flips = 0
    for seed in range(30):
        try:
            s = build_sam_sample("sa_5", jpeg_bytes(image), record, cfg, np.random.default_rng(seed))
        except BadSample:
            continue  # the crop can miss the square entirely
        bright = F.avg_pool2d(s["image"][:1].float()[None], 4)[0, 0] > 128  # image at mask resolution
        mask = s["masks"][0]
        # equal up to one boundary pixel: each one's interior lies inside the other
        assert not (_erode(mask) & ~bright).any() and not (_erode(bright) & ~mask).any(), seed
        x0, _, x1, _ = s["boxes"][0].tolist()
        flips += x0 < 64  # the square sits right of centre unless flipped (or cropped)
    assert flips > 0


def _erode(mask: torch.Tensor) -> torch.Tensor:
    return ~(F.max_pool2d((~mask).float()[None, None], 3, stride=1, padding=1)[0, 0] > 0)


def _good_sample(i):
    image, masks = make_image(i)
    return sample_key(i), jpeg_bytes(image), record_for(i, image, masks)


def test_bad_input_is_skipped_counted_and_named(tmp_path):
    with SA1BShardWriter(tmp_path, max_samples_per_shard=100) as writer:
        for i in range(3):
            writer.write(*_good_sample(i))
        key, jpeg, record = _good_sample(10)
        writer.write(key, b"not a jpeg at all", record)  # undecodable JPEG
        key, jpeg, record = _good_sample(11)
        record["annotations"][0]["segmentation"]["counts"] = "))))"  # malformed RLE
        writer.write(key, jpeg, record)
        key, jpeg, record = _good_sample(12)
        record["image"]["height"] += 1
        for a in record["annotations"]:
            a["segmentation"]["size"][0] += 1  # consistent JSON, but not the image's size
        writer.write(key, jpeg, record)
        key, jpeg, record = _good_sample(13)
        record["annotations"] = []  # nothing to train on
        writer.write(key, jpeg, record)
        writer.write(*_good_sample(14))
    # a second shard, truncated in the middle of its third member
    write_shards(tmp_path / "t", num_images=4, per_shard=10)
    data = (tmp_path / "t" / "sa_000000.tar").read_bytes()
    with tarfile.open(tmp_path / "t" / "sa_000000.tar") as tar:
        cut = tar.getmembers()[4].offset_data + 10
    (tmp_path / "truncated.tar").write_bytes(data[:cut])

    urls = expand_shard_patterns([str(tmp_path / "sa_000000.tar"), str(tmp_path / "truncated.tar")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(torch.utils.data.DataLoader(sam_sample_pipeline(urls, SMALL, mode="once"), batch_size=2, collate_fn=collate_sam_samples))
    keys = [k for b in batches for k in b["keys"]]
    assert keys == ["sa_0", "sa_1", "sa_2", "sa_14", "sa_0", "sa_1"]
    total: dict[str, int] = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            total[reason] = total.get(reason, 0) + n
    assert total.get("bad_sample") == 4
    assert total.get("corrupt_shard", 0) >= 1
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
    for key, reason in (("sa_10", "undecodable"), ("sa_11", "RLE"), ("sa_12", "image is"), ("sa_13", "no usable mask")):
        assert any(key in m and reason in m and "sa_000000.tar" in m for m in messages), (key, messages)
    assert any("truncated.tar" in m for m in messages)


def test_a_pattern_matching_nothing_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_shard_patterns(str(tmp_path / "nothing_here_{000..003}.tar"))
    write_shards(tmp_path, num_images=4, per_shard=1)
    assert len(expand_shard_patterns(str(tmp_path / "sa_{000000..000003}.tar"))) == 4
    assert len(expand_shard_patterns(str(tmp_path / "sa_*.tar"))) == 4


def test_datamodule_with_workers_counts_skips_and_sizes_epochs(tmp_path):
    from segany_train.data.datamodule import SA1BDataModule

    with SA1BShardWriter(tmp_path, max_samples_per_shard=3) as writer:
        for i in range(12):
            key, jpeg, record = _good_sample(i)
            writer.write(key, b"corrupt" if i in (4, 9) else jpeg, record)
    dm = SA1BDataModule(
        train_shards=str(tmp_path / "sa_{000000..000003}.tar"),
        val_shards=str(tmp_path / "sa_*.tar"),
        sample=SMALL,
        batch_size=2,
        num_workers=2,
        train_mode="split_repeat",
        samples_per_epoch=8,
    )
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = list(dm.train_dataloader())
        val = list(dm.val_dataloader())
    assert len(train) == len(dm.train_dataloader()) == 4 and sum(len(b["keys"]) for b in train) == 8
    assert sorted(k for b in val for k in b["keys"]) == sorted(f"sa_{i}" for i in range(12) if i not in (4, 9))
    assert sum(b["skipped"].get("bad_sample", 0) for b in val) == 2
    assert all(b["masks"].shape[0] == b["image_index"].shape[0] == b["boxes"].shape[0] for b in train)
    with pytest.raises(ValueError, match="leaves loaders empty"):
        SA1BDataModule(train_shards=str(tmp_path / "sa_000000.tar"), sample=SMALL, num_workers=2, train_mode="split_repeat").setup("fit")


def test_shards_without_a_manifest_are_counted_from_their_tar_index(tmp_path):
    from segany_train.data.datamodule import count_samples

    released = write_release_tars(tmp_path / "released", [4, 3])
    listed = write_shards(tmp_path / "listed", num_images=5, per_shard=5)
    assert count_samples([str(p) for p in released + listed]) == 12


def test_released_tars_size_the_epoch_and_validation_workers_split_the_samples(tmp_path):
    from segany_train.data.datamodule import SA1BDataModule

    write_release_tars(tmp_path / "train", [4, 4])
    write_release_tars(tmp_path / "val", [2, 2], first_id=100)
    dm = SA1BDataModule(
        train_shards=str(tmp_path / "train" / "sa_{000000..000001}.tar"),
        val_shards=str(tmp_path / "val" / "sa_{000000..000001}.tar"),
        sample=SMALL,
        batch_size=2,
        num_workers=4,
    )
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 4  # 8 samples: 2 per worker, one batch each
    val = dm.val_dataloader()
    assert val.num_workers == 4  # split by sample: 4 samples, one per worker, though only 2 shards
    assert sorted(k for b in val for k in b["keys"]) == [f"sa_{i}" for i in range(100, 104)]
