"""Issue 15: the training step on the hardware users train on (CUDA, bf16) and fidelity to SAM / SAM 2.

No GPU here, so each test recreates the GPU condition on CPU: a default device that differs from the
generator's, a decoder whose outputs are bf16 while the embeddings are fp32 (what CUDA autocast
gives), CPU autocast for ops on its lower-precision list. `tests/gpu/` runs the real thing.
"""

from pathlib import Path

import numpy as np
import torch

from segany_train.prompting.rollout import RolloutConfig, iteration_schedule, run_rollout


def _gt_masks(n: int = 6, side: int = 32) -> torch.Tensor:
    gt = torch.zeros(n, side, side, dtype=torch.bool)
    for i in range(n):
        gt[i, 4 + i : 20 + i, 6 : 14 + 2 * i] = True
    return gt


def test_refinement_position_is_drawn_on_the_host():
    # A draw on the device would have to be read back (a host sync per step on CUDA): the position
    # comes from a numpy generator, whatever the default device (meta here, which cannot be read).
    cfg = RolloutConfig()
    with torch.device("meta"):
        schedule = iteration_schedule(cfg, np.random.default_rng(0))
    assert schedule == iteration_schedule(cfg, np.random.default_rng(0))
    assert schedule.count(False) == 2 and schedule[-1] is False


def test_rollout_takes_the_decoders_bf16_outputs_to_fp32_for_the_loss(tiny_sam):
    # CUDA autocast runs the decoder's matmuls in bf16 while the image embeddings stay fp32, and
    # (unlike CPU autocast) does not promote index_copy: the hook gives the decoder's outputs the
    # dtype they have there. The loss and the upsampling take them in fp32 (as SAM 2 does).
    tiny_sam.mask_decoder.register_forward_hook(lambda module, args, out: tuple(t.to(torch.bfloat16) for t in out))
    gt = _gt_masks()
    embeddings = torch.randn(2, 32, 8, 8)
    seen = []
    run_rollout(
        tiny_sam, embeddings, gt, torch.tensor([0, 0, 0, 1, 1, 1]), RolloutConfig(), seen.append,
        torch.Generator().manual_seed(0),
    )
    assert len(seen) == 11
    assert all(g.logits.dtype == g.iou_pred.dtype == torch.float32 for o in seen for g in o.groups)
    assert all(o.shown.dtype == torch.float32 for o in seen)


def test_rollout_output_rows_follow_the_prompts_when_single_and_multi_output_rows_interleave(tiny_sam):
    # the outputs are assembled from two decoder calls (3-output and 1-output rows): row i must be
    # prompt i's, as decoding each prompt alone gives
    gt = _gt_masks()
    embeddings = torch.randn(2, 32, 8, 8)
    image_index = torch.tensor([0, 0, 0, 1, 1, 1])
    seen = []
    cfg = RolloutConfig(num_iterations=1, num_correction_clicks=0, box_probability=0.5)
    run_rollout(tiny_sam, embeddings, gt, image_index, cfg, seen.append, torch.Generator().manual_seed(1))
    out = seen[0]
    logits, iou_pred = out.expanded()
    single = (out.point_labels >= 0).sum(1) == 1
    assert 0 < single.sum() < 6
    for i in range(6):
        low, iou = tiny_sam.decode(
            embeddings,
            image_index=image_index[i : i + 1],
            point_coords=out.point_coords[i : i + 1],
            point_labels=out.point_labels[i : i + 1],
            multimask_output=bool(single[i]),
        )
        torch.testing.assert_close(logits[i], low[0].expand(3, -1, -1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(iou_pred[i], iou[0].expand(3), atol=1e-4, rtol=1e-4)


def test_positional_encoding_is_fp32_under_autocast_and_not_reused_across_dtypes(tiny_sam):
    pe = tiny_sam.prompt_encoder
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_bf16 = pe.get_dense_pe()
        points = pe.embed_labelled_points(torch.tensor([[[10.0, 20.0]]]), torch.tensor([[1]]))
    assert dense_bf16.dtype == torch.float32 and points.dtype == torch.float32
    dense = pe.get_dense_pe()
    assert dense.dtype == torch.float32
    pe.pe_layer._grid_cache = None
    torch.testing.assert_close(dense, pe.get_dense_pe(), rtol=0, atol=0)
    torch.testing.assert_close(dense_bf16, dense, rtol=0, atol=0)


def test_a_mask_prompt_is_not_dropped_when_shared_keys_are_passed(tiny_sam):
    # shared keys are made without a mask prompt; a caller who passes them with one prompt that has
    # a mask must still get the mask's effect (the decoder detects the no-mask case, not "one row")
    embeddings = torch.randn(1, 32, 8, 8)
    pe = tiny_sam.prompt_encoder
    keys = tiny_sam.mask_decoder.prepare_shared_keys(embeddings, pe.get_dense_pe(), pe.no_mask_dense(1))
    sparse, dense = pe((torch.tensor([[[40.0, 50.0]]]), torch.tensor([[1]])), None, torch.randn(1, 1, 32, 32) * 5)
    expected = tiny_sam.mask_decoder(embeddings, pe.get_dense_pe(), sparse, dense, True)
    got = tiny_sam.mask_decoder(embeddings, pe.get_dense_pe(), sparse, dense, True, shared_keys=keys)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _, no_mask = pe((torch.tensor([[[40.0, 50.0]]]), torch.tensor([[1]])), None, None)
    assert not torch.allclose(expected[0], tiny_sam.mask_decoder(embeddings, pe.get_dense_pe(), sparse, no_mask, True)[0])
    # the no-mask case still uses the keys it is given
    torch.testing.assert_close(
        tiny_sam.mask_decoder(embeddings, pe.get_dense_pe(), sparse, no_mask, True, shared_keys=keys),
        tiny_sam.mask_decoder(embeddings, pe.get_dense_pe(), sparse, no_mask, True),
        atol=1e-5, rtol=1e-5,
    )


def _recording_decode(sam, calls: list):
    """Records each `Sam.decode` call's prompts (the real decode still runs)."""
    decode = sam.decode

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return decode(*args, **kwargs)

    sam.decode = recorded
    return sam


def test_sam2_gt_mask_first_prompt_replaces_points_and_boxes(tiny_sam):
    calls: list = []
    _recording_decode(tiny_sam, calls)
    n = 64
    gt = torch.zeros(n, 32, 32, dtype=torch.bool)
    gt[:, 8:20, 6:22] = True
    cfg = RolloutConfig(num_iterations=1, num_correction_clicks=0, box_probability=0.5, gt_mask_prompt_probability=0.5)
    run_rollout(tiny_sam, torch.randn(1, 32, 8, 8), gt, torch.zeros(n, dtype=torch.long), cfg, lambda out: None,
                torch.Generator().manual_seed(0))
    box = point = masked = 0
    for call in calls:
        labels = call["point_labels"]
        has_mask = torch.full((labels.shape[0],), call["mask_inputs"] is not None)  # decoded in groups with or without
        is_box = (labels == 2).any(1)
        is_point = (labels == 1).any(1)
        assert not (has_mask & (is_box | is_point)).any(), "a GT-mask prompt came with a box or a point"
        assert ((labels >= 0).any(1) | has_mask).all()
        box, point, masked = box + int(is_box.sum()), point + int(is_point.sum()), masked + int(has_mask.sum())
    assert box + point + masked == n and box > 0 and point > 0 and masked > 0


def test_training_and_validation_never_click_into_the_padding(tiny_sam, tmp_path):
    import lightning as L

    from segany_train.prompting.rollout import interactive_ious
    from segany_train.training.module import EVAL_ROLLOUT, SamTrainingModule
    from segany_train.training.optim import OptimConfig

    # two 128x40 images (a third of the width holds the image, the rest is padding) whose masks
    # fill the image's left part; the model over-predicts (foreground everywhere, padding included)
    tiny_sam.mask_decoder.register_forward_hook(lambda module, args, out: (out[0] + 10.0, out[1]))
    images = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    gt = torch.zeros(4, 32, 32, dtype=torch.bool)
    gt[:, 4:28, 1:9] = True
    batch = {
        "image": images,
        "input_size": torch.tensor([[128, 40], [128, 40]]),
        "valid_size": torch.tensor([[32, 10], [32, 10]]),
        "original_size": torch.tensor([[384, 120], [384, 120]]),
        "masks": gt,
        "image_index": torch.tensor([0, 0, 1, 1]),
        "skipped": {},
    }
    calls: list = []
    _recording_decode(tiny_sam, calls)
    module = SamTrainingModule(tiny_sam, optim=OptimConfig(warmup_steps=1), rollout=RolloutConfig(box_probability=0.0))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    clicks = [(c["point_coords"], c["point_labels"]) for c in calls]
    background = torch.cat([coords[labels == 0] for coords, labels in clicks])
    assert background.numel() > 0
    assert (background[:, 0] < 40).all(), "a background click fell into the padding"
    # in-training validation is segany-eval's protocol: predictions cleared in the padding
    module.eval()
    valid = torch.zeros(4, 32, 32, dtype=torch.bool)
    valid[:, :, :10] = True
    with torch.no_grad():
        embeddings = tiny_sam.image_encoder(tiny_sam.normalize_padded(images, batch["input_size"]))
    expected = interactive_ious(tiny_sam, embeddings, gt, batch["image_index"], EVAL_ROLLOUT, valid=valid)
    got = module.interactive_miou(batch)
    for k in got:
        torch.testing.assert_close(got[k], expected[k].shown)


def _one_batch(n_masks: int = 2) -> dict:
    gt = torch.zeros(n_masks, 32, 32, dtype=torch.bool)
    gt[:, 4:20, 6:22] = True
    return {
        "image": torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8),
        "input_size": torch.tensor([[128, 128]]),
        "valid_size": torch.tensor([[32, 32]]),
        "original_size": torch.tensor([[128, 128]]),
        "masks": gt,
        "image_index": torch.zeros(n_masks, dtype=torch.long),
        "skipped": {},
    }


def _fit(module, batches: list[dict], **trainer_kwargs) -> None:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def test_a_frozen_encoder_stays_in_eval_mode_so_drop_path_is_off():
    from omegaconf import OmegaConf

    from segany_train.training.module import SamTrainingModule
    from segany_train.training.run import build_model

    cfg = OmegaConf.create({
        "name": "vit_t_256", "overrides": {"image_size": 128}, "checkpoint": None, "freeze": ["image_encoder"],
        "lora_rank": 0, "lora_alpha": 1.0, "drop_path": 0.5, "tied_cross_attention_init": 0.0,
    })
    sam = build_model(cfg)
    modes = []
    sam.image_encoder.register_forward_pre_hook(lambda module, args: modes.append((module.training, sam.mask_decoder.training)))
    module = SamTrainingModule(sam, rollout=RolloutConfig(num_iterations=2, num_correction_clicks=1))
    _fit(module, [_one_batch()])
    assert modes == [(False, True)]
    module.eval().train()  # as after a validation run
    assert not sam.image_encoder.training and sam.mask_decoder.training


def test_fine_tuning_does_not_inherit_the_pre_training_drop_path(tmp_path):
    from hydra import compose, initialize_config_dir

    from segany_train.config_paths import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        pretrain = compose("train", overrides=["model=vit_b", f"run_dir={tmp_path}"])
        finetune = compose("train", overrides=["experiment=finetune_coco", f"run_dir={tmp_path}"])
    assert pretrain.model.drop_path == 0.6
    assert finetune.model.drop_path == 0.1


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from segany_train.config_paths import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=overrides)


def test_the_cosine_schedule_length_follows_max_steps_unless_set(tmp_path):
    from segany_train.training.run import optim_config

    derived = optim_config(_compose(["optim=sam2", "trainer.max_steps=500", f"run_dir={tmp_path}"]))
    assert derived.total_steps == 500
    explicit = optim_config(_compose(["optim=sam2", "trainer.max_steps=500", "optim.total_steps=5000", f"run_dir={tmp_path}"]))
    assert explicit.total_steps == 5000  # the data engine's one schedule across many retrains
    for experiment in ("tiny_synthetic_cpu", "finetune_coco", "sam_vit_b_sa1b", "sam_vit_h_sa1b"):
        cfg = _compose([f"experiment={experiment}", "trainer.max_steps=123", f"run_dir={tmp_path}"])
        assert optim_config(cfg).total_steps == 123, experiment


def test_no_trainer_offers_gradient_accumulation_that_manual_optimisation_rejects(tmp_path):
    from segany_train.config_paths import CONFIG_DIR

    for trainer in sorted(p.stem for p in (Path(CONFIG_DIR) / "trainer").glob("*.yaml")):
        cfg = _compose([f"trainer={trainer}", f"run_dir={tmp_path}"])
        assert "accumulate_grad_batches" not in cfg.trainer, trainer


def test_encoder_activation_checkpointing_is_a_config_value(tmp_path):
    from segany_train.training.run import build_model

    cfg = _compose(["model.activation_checkpointing=true", f"run_dir={tmp_path}"])
    assert build_model(cfg.model).image_encoder.activation_checkpointing is True
    assert build_model(_compose([f"run_dir={tmp_path}"]).model).image_encoder.activation_checkpointing is False


def test_launch_scripts_and_configs_name_only_trainers_that_exist():
    import re

    from segany_train.config_paths import CONFIG_DIR

    root = Path(CONFIG_DIR).parent
    trainers = {p.stem for p in (Path(CONFIG_DIR) / "trainer").glob("*.yaml")}
    files = [*root.glob("slurm/*.sbatch"), *root.glob("slurm/*.sh"), *Path(CONFIG_DIR).rglob("*.yaml")]
    for path in files:
        text = path.read_text()
        for name in re.findall(r"trainer=(\w+)", text) + re.findall(r"trainer=\w+ or (\w+)", text):
            assert name in trainers, f"{path} names trainer={name}"


def _mae_state_dict(dim: int, depth: int, grid: int, patch: int) -> dict[str, torch.Tensor]:
    """A small state dict in the MAE repository's layout (pre-training checkpoint, decoder included)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": r(dim), "norm.bias": r(dim),
        "mask_token": r(1, 1, 16), "decoder_embed.weight": r(16, dim), "decoder_pred.bias": r(3 * patch * patch),
    }  # fmt: skip
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": r(dim), b + "norm1.bias": r(dim), b + "norm2.weight": r(dim), b + "norm2.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim),
        }  # fmt: skip
    return sd


def test_an_mae_vit_checkpoint_initialises_the_image_encoder(tmp_path):
    import torch.nn.functional as F

    from segany_train.model import build_sam
    from segany_train.model.mae import load_mae_encoder
    from tests.conftest import TINY

    sam = build_sam(TINY)  # 128 px, patch 16: an 8x8 grid; MAE was pre-trained at 224 px (14x14)
    encoder = sam.image_encoder
    rel_before = {k: v.clone() for k, v in encoder.state_dict().items() if "rel_pos" in k or k.startswith("neck")}
    mae = _mae_state_dict(dim=32, depth=2, grid=14, patch=16)
    left = load_mae_encoder(encoder, {"model": mae})
    assert set(left) == set(rel_before)  # relative-position tables and the neck stay at their init
    for k, v in rel_before.items():
        assert torch.equal(encoder.state_dict()[k], v)
    torch.testing.assert_close(encoder.blocks[1].mlp.lin2.weight, mae["blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(encoder.blocks[0].attn.qkv.bias, mae["blocks.0.attn.qkv.bias"])
    torch.testing.assert_close(encoder.patch_embed.proj.weight, mae["patch_embed.proj.weight"])
    # the cls token's entry is dropped, the 14x14 grid resampled to 8x8
    grid = mae["pos_embed"][:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(encoder.pos_embed.data, expected)
    # a ViT of another width fails with one line naming a key and both shapes
    import pytest

    with pytest.raises(ValueError, match=r"^MAE checkpoint \S+: shape \(.*48\), the encoder.s is"):
        load_mae_encoder(encoder, _mae_state_dict(dim=48, depth=2, grid=14, patch=16))
    # from the training config: model.mae_checkpoint
    torch.save({"model": mae}, tmp_path / "mae.pth")
    from omegaconf import OmegaConf

    from segany_train.training.run import build_model

    cfg = OmegaConf.create({
        "name": "vit_t_256", "overrides": {"image_size": 128, "encoder_embed_dim": 32, "encoder_depth": 2,
        "encoder_num_heads": 2, "encoder_global_attn_indexes": [1]}, "checkpoint": None,
        "mae_checkpoint": str(tmp_path / "mae.pth"), "freeze": [], "lora_rank": 0, "lora_alpha": 1.0,
        "drop_path": 0.0, "tied_cross_attention_init": 0.0,
    })  # fmt: skip
    built = build_model(cfg)
    torch.testing.assert_close(built.image_encoder.blocks[1].mlp.lin2.weight, mae["blocks.1.mlp.fc2.weight"])


def test_coco_ap_max_dets_is_a_parameter():
    import numpy as np
    import pytest

    from segany_train.data.sa1b import annotation_from_mask, make_record
    from segany_train.evaluation.coco_ap import STAT_NAMES, coco_mask_ap

    masks = []
    for i in range(5):  # five disjoint 12x12 squares, all found exactly
        m = np.zeros((64, 64), bool)
        m[2 + 12 * i : 14 + 12 * i, 4:16] = True
        masks.append(m)
    record = make_record(image_id=0, width=64, height=64, file_name="x.jpg",
                         annotations=[annotation_from_mask(m, annotation_id=i) for i, m in enumerate(masks)])  # fmt: skip
    preds = [{"segmentation": m, "predicted_iou": 1.0 - 0.1 * i} for i, m in enumerate(masks)]
    default = coco_mask_ap([record], [preds])
    assert list(default) == list(STAT_NAMES) and default["AP"] == pytest.approx(1.0)
    capped = coco_mask_ap([record], [preds], max_dets=(1, 2, 3))
    assert list(capped)[6:9] == ["AR@1", "AR@2", "AR@3"]
    assert capped["AR@3"] == pytest.approx(3 / 5) and capped["AR@2"] == pytest.approx(2 / 5)
    assert capped["AP"] == pytest.approx(61 / 101)  # precision 1 up to recall 0.6 (61 of 101 recall points)
    with pytest.raises(ValueError, match="max_dets"):
        coco_mask_ap([record], [preds], max_dets=(10, 1, 100))


def test_high_resolution_supervision_upsamples_the_logits_to_the_gt(tiny_sam):
    # data.mask_size above the decoder's low-res frame: GT at 64x64 for a 32x32 decoder output
    import torch.nn.functional as F

    gt = _gt_masks(side=32).repeat_interleave(2, 1).repeat_interleave(2, 2)  # 6 x 64 x 64
    embeddings = torch.randn(2, 32, 8, 8)
    image_index = torch.tensor([0, 0, 0, 1, 1, 1])
    seen = []
    cfg = RolloutConfig(num_iterations=3, num_correction_clicks=1, gt_mask_prompt_probability=0.5)
    run_rollout(tiny_sam, embeddings, gt, image_index, cfg, seen.append, torch.Generator().manual_seed(1))
    assert [o.shown.shape[-2:] for o in seen] == [(64, 64)] * 3
    assert all(g.logits.shape[-2:] == (64, 64) for o in seen for g in o.groups)
    first = seen[0]
    first_logits = first.expanded()[0]
    for i in range(6):
        if (first.point_labels[i] >= 0).any():  # point- or box-prompted: decode it alone at low res
            low, _ = tiny_sam.decode(embeddings, image_index=image_index[i : i + 1], point_coords=first.point_coords[i : i + 1],
                                     point_labels=first.point_labels[i : i + 1],
                                     multimask_output=bool((first.point_labels[i] >= 0).sum() == 1))  # fmt: skip
            up = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
            torch.testing.assert_close(first_logits[i], up[0].expand(3, -1, -1), atol=1e-4, rtol=1e-4)
    from segany_train.training.losses import LossWeights, grouped_sam_loss

    assert torch.isfinite(grouped_sam_loss(seen[-1].groups, gt, LossWeights()).total)
