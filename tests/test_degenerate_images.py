"""Very thin images (3x2000) resize to at least one pixel and go through inference and training."""

import numpy as np
from PIL import Image

from segany_train.data.sa1b import annotation_from_mask, make_record
from segany_train.data.sam_sample import SamSampleConfig, build_sam_sample
from segany_train.inference import amg_cli
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.model.transforms import ResizeLongestSide
from tests.shards import jpeg_bytes

THIN = np.random.default_rng(0).integers(0, 255, (3, 2000, 3)).astype(np.uint8)


def test_the_resize_keeps_at_least_one_pixel():
    assert ResizeLongestSide.get_preprocess_shape(3, 2000, 1024) == (2, 1024)
    assert ResizeLongestSide.get_preprocess_shape(3, 2000, 128) == (1, 128)


def test_automatic_masks_of_a_thin_image(tiny_sam):
    generator = SamAutomaticMaskGenerator(tiny_sam, points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0)
    for mask in generator.generate(THIN):
        assert mask["segmentation"].shape == (3, 2000)


def test_a_training_sample_of_a_thin_image():
    mask = np.zeros((3, 2000), bool)
    mask[:, 100:900] = True
    record = make_record(image_id=0, width=2000, height=3, file_name="thin.jpg", annotations=[annotation_from_mask(mask, annotation_id=1)])
    sample = build_sam_sample("thin", jpeg_bytes(THIN), record, SamSampleConfig(image_size=128, mask_size=32), np.random.default_rng(0))
    assert sample["masks"].shape == (1, 32, 32) and sample["masks"].any()


def test_segany_amg_goes_through_a_thin_image(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(THIN).save(tmp_path / "in" / "thin.png")
    amg_cli.main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model-type", "vit_t_256_small_decoder",
                  "--no-progress", "--points-per-side", "2"])
    assert "1 done now" in capsys.readouterr().out
