"""The sa1b recipes supervise at the input resolution (`data.mask_size: input`), as SAM 2 does: the GT
masks, the loss and the clicks at 1024 px for vit_b and vit_h, the decoder's logits upsampled."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from segany_train.config_paths import CONFIG_DIR
from segany_train.training.run import RunConfigError, build_datamodule, build_model, check_training_values


def _compose(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize(("experiment", "model", "side"), [
    ("sam_vit_b_sa1b", None, 1024), ("sam_vit_h_sa1b", None, 1024), ("sam_vit_b_sa1b", "vit_t_256", 256),
])  # fmt: skip
def test_the_sa1b_recipes_supervise_at_the_input_resolution(experiment, model, side, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"run_dir={tmp_path}", *([f"model={model}"] if model else [])])
    with torch.device("meta"):
        sam = build_model(cfg.model)
    datamodule = build_datamodule(cfg, sam)
    assert datamodule.sample.image_size == datamodule.sample.mask_size == side


def test_other_recipes_keep_the_low_res_frame_and_bad_values_are_refused(tmp_path):
    cfg = _compose(["experiment=tiny_synthetic_cpu", f"run_dir={tmp_path}"])
    with torch.device("meta"):
        sam = build_model(cfg.model)
    assert build_datamodule(cfg, sam).sample.mask_size == sam.image_encoder.img_size // 4
    with pytest.raises(RunConfigError, match="data.mask_size"):
        check_training_values(_compose(["experiment=tiny_synthetic_cpu", "data.mask_size=full", f"run_dir={tmp_path}"]))
