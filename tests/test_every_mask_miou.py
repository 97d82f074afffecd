"""Masks too small for the low-res frame (no pixel survives the resize) are no click's target, so
they leave mIoU and NoC; segany-eval reports beside today's mIoU one over every GT mask, where each
vanished mask counts 0, and training validation keeps every mask training's min_mask_pixels leaves
out (and logs the every-mask figure too)."""

import numpy as np
import pytest
import torch

from segany_train.data.datamodule import SA1BDataModule
from segany_train.data.sa1b import annotation_from_mask, make_record
from segany_train.data.sam_sample import SamSampleConfig
from segany_train.data.shard_writer import SA1BShardWriter
from segany_train.evaluation.interactive import InteractiveEvalConfig, evaluate_interactive
from segany_train.model import build_sam_by_name
from tests.shards import jpeg_bytes


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    """One 256x256 image: a large square, a 12x12 square (9 pixels at 64x64) and a single pixel at
    (1, 1), which the nearest-neighbour resize to 64x64 (rows and columns 0, 4, 8, ...) never samples."""
    directory = tmp_path_factory.mktemp("shard")
    masks = [np.zeros((256, 256), bool) for _ in range(3)]
    masks[0][40:200, 60:220] = True
    masks[1][200:212, 8:20] = True
    masks[2][1, 1] = True
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    record = make_record(image_id=1, width=256, height=256, file_name="sa_1.jpg",
                         annotations=[annotation_from_mask(m, annotation_id=i) for i, m in enumerate(masks)])  # fmt: skip
    with SA1BShardWriter(directory) as writer:
        writer.write("sa_1", jpeg_bytes(image), record)
    return str(directory / "sa_000000.tar")


def test_segany_eval_reports_miou_over_every_mask_counting_vanished_ones_zero(shard):
    torch.manual_seed(0)
    sam = build_sam_by_name("vit_t_256_small_decoder")
    report = evaluate_interactive(sam, [shard], InteractiveEvalConfig(max_clicks=3, iou_resolution="low_res"), progress=False)
    assert report["masks"] == 2 and report["masks_vanished"] == 1 and report["masks_in_images"] == 3
    for k, miou in report["miou"].items():
        assert report["miou_every_mask"][k] == pytest.approx(miou * 2 / 3)


def test_validation_keeps_the_masks_training_leaves_out(shard):
    datamodule = SA1BDataModule(
        train_shards=shard, val_shards=shard, sample=SamSampleConfig(image_size=256, mask_size=64, min_mask_pixels=16)
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["annotation_ids"].tolist() == [0, 1]  # the 9-pixel mask too; training's filter drops it
    assert batch["masks_vanished"].tolist() == [1]
