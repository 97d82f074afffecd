"""The valid (non-padding) region of a sample's mask frame: the sample carries it (`valid_size`, where
its GT masks were placed) and training and evaluation both use it. Computed from the input size
instead, training's region was a low-res row or column off for 175 of 1575 image sizes, e.g. 235x777:
78 rows where the GT frame holds 77."""

import numpy as np
import torch

from segany_train.data.pipeline import collate_sam_samples
from segany_train.data.sam_sample import SamSampleConfig, build_sam_sample, valid_region
from segany_train.model import SamConfig, build_sam
from segany_train.training.module import SamTrainingModule
from tests.shards import jpeg_bytes, record_for


def test_training_and_evaluation_take_the_valid_region_from_the_sample_235x777():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (235, 777, 3), dtype=np.uint8)
    mask = np.zeros((235, 777), bool)
    mask[:, 300:500] = True  # every row of the image: the GT reaches the frame's last image row
    record = record_for(1, image, [mask])
    sample = build_sam_sample("sa_1", jpeg_bytes(image), record, SamSampleConfig(image_size=1024, mask_size=256), rng)
    batch = collate_sam_samples([{**sample, "skipped": {}}])
    gt_rows = int(batch["masks"][0].any(1).sum())
    assert tuple(batch["valid_size"][0].tolist()) == (gt_rows, 256) == (77, 256)
    expected = torch.zeros(1, 256, 256, dtype=torch.bool)
    expected[:, :77, :] = True
    # evaluation (segany-eval and in-training validation) and training's clicks use the same region
    torch.testing.assert_close(valid_region(batch["valid_size"], 256), expected)
    config = SamConfig(image_size=1024, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, encoder_window_size=4,
                       encoder_global_attn_indexes=(0,), prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=4,
                       iou_head_hidden_dim=32)  # fmt: skip
    module = SamTrainingModule(build_sam(config))
    torch.testing.assert_close(module._valid(batch), expected)
