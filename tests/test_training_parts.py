"""Training pieces: the rollout schedule, SAM's loss on a hand-computed case, LoRA, export, optimiser."""

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from segany_train.model import SAM_CONFIGS, build_sam, build_sam_by_name, build_sam_from_checkpoint
from segany_train.model.attention_init import tie_cross_attention_queries_and_keys
from segany_train.model.checkpoint import save_official_checkpoint
from segany_train.model.lora import LoRALinear, add_lora_to_encoder_attention, merge_lora
from segany_train.prompting.rollout import RolloutConfig, iteration_schedule, run_rollout
from segany_train.training.losses import LossWeights, dice_loss, focal_loss, sam_loss
from segany_train.training.optim import OptimConfig, build_optimizer, lr_factor
from tests.conftest import TINY, randomized


def test_schedule_is_eight_clicks_and_two_refinements_one_at_the_end():
    seen_positions = set()
    for seed in range(40):
        schedule = iteration_schedule(RolloutConfig(), np.random.default_rng(seed))
        assert len(schedule) == 10 and sum(schedule) == 8 and schedule[-1] is False
        seen_positions.add(schedule.index(False))
    assert len(seen_positions) > 4  # the other refinement moves around
    sam2 = iteration_schedule(RolloutConfig(num_iterations=10, num_correction_clicks=7), np.random.default_rng(0))
    assert len(sam2) == 9 and sum(sam2) == 7
    with pytest.raises(ValueError):
        RolloutConfig(num_iterations=5, num_correction_clicks=8)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_loss_matches_a_hand_computed_example():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]], [[-2.0, 1.0], [0.0, 0.0]]]])  # 1 prompt, 2 outputs, 2x2
    gt = torch.tensor([[[True, False], [True, False]]])
    # focal for output 0, pixel by pixel: p_t = p if gt else 1 - p; alpha_t = .25 if gt else .75
    expected_focal = []
    expected_dice = []
    for out in logits[0]:
        terms, inter, psum = [], 0.0, 0.0
        for x, g in zip(out.flatten().tolist(), gt.flatten().tolist()):
            p = _sigmoid(x)
            p_t = p if g else 1 - p
            terms.append((0.25 if g else 0.75) * (1 - p_t) ** 2 * -math.log(p_t))
            inter += p * g
            psum += p
        expected_focal.append(sum(terms) / 4)
        expected_dice.append(1 - (2 * inter + 1) / (psum + 2 + 1))
    assert torch.allclose(focal_loss(logits, gt)[0], torch.tensor(expected_focal), atol=1e-6)
    assert torch.allclose(dice_loss(logits, gt)[0], torch.tensor(expected_dice), atol=1e-6)
    iou_pred = torch.tensor([[0.9, 0.2]])
    out = sam_loss(logits, iou_pred, gt, LossWeights())
    mask_losses = [20 * f + d for f, d in zip(expected_focal, expected_dice)]
    best = min(range(2), key=lambda i: mask_losses[i])
    true_iou = [1.0, 0.0]  # output 0 thresholded at 0 is exactly the GT; output 1 misses it
    iou_mse = ((0.9 - true_iou[0]) ** 2 + (0.2 - true_iou[1]) ** 2) / 2
    assert out.best.item() == best == 0
    assert out.total.item() == pytest.approx(mask_losses[best] + iou_mse, rel=1e-5)
    l1 = sam_loss(logits, iou_pred, gt, LossWeights(iou_loss="l1"))
    assert l1.iou.item() == pytest.approx((0.1 + 0.2) / 2, rel=1e-5)


def test_rollout_feeds_back_detached_masks_and_uses_multimask_only_for_a_single_point(tiny_sam):
    gt = torch.zeros(6, 32, 32, dtype=torch.bool)
    for i in range(6):
        gt[i, 4 + i : 20 + i, 6 : 14 + 2 * i] = True
    embeddings = torch.randn(2, 32, 8, 8, requires_grad=True)
    image_index = torch.tensor([0, 0, 0, 1, 1, 1])
    seen = []

    def on_iteration(out):
        assert all(g.logits.requires_grad for g in out.groups)
        seen.append(out)

    cfg = RolloutConfig(box_probability=0.5)
    run_rollout(tiny_sam, embeddings, gt, image_index, cfg, on_iteration, torch.Generator().manual_seed(0))
    assert [o.step for o in seen] == list(range(11))
    steps = [b.interactions - a.interactions for a, b in zip(seen, seen[1:])]
    assert seen[0].interactions == 1 and steps.count(1) == 8 and steps.count(0) == 2 and steps[-1] == 0
    first = seen[0].expanded()[0]
    distinct = (first[:, 0] != first[:, 1]).flatten(1).any(1)
    assert 0 < distinct.sum() < 6  # point-prompted rows have 3 outputs, box-prompted rows 1 repeated
    assert [g.logits.shape[1] for g in seen[1].groups] == [1]  # later: always one output
    # gradients reach the embeddings from the last iteration alone: the feedback is detached, so the
    # last loss's graph does not pass through earlier decoder iterations
    sum(g.logits.sum() for g in seen[-1].groups).backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_lora_starts_as_identity_and_merges_exactly():
    torch.manual_seed(0)
    sam = randomized(build_sam(TINY)).eval()
    x = torch.randn(1, 3, 128, 128)
    before = sam.image_encoder(x)
    assert add_lora_to_encoder_attention(sam.image_encoder, rank=4) == 2
    assert torch.allclose(sam.image_encoder(x), before, atol=1e-6)
    trainable = {n for n, p in sam.image_encoder.named_parameters() if p.requires_grad}
    assert any("lora_a" in n for n in trainable) and not any(n.endswith("qkv.base.weight") for n in trainable)
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.qkv.lora_b.normal_(std=0.5)
    adapted = sam.image_encoder(x)
    assert not torch.allclose(adapted, before, atol=1e-3)
    assert merge_lora(sam) == 2 and not any(isinstance(m, LoRALinear) for m in sam.modules())
    assert torch.allclose(sam.image_encoder(x), adapted, atol=1e-5)


def test_export_merges_lora_and_reloads_strictly(tmp_path):
    torch.manual_seed(0)
    sam = randomized(build_sam(TINY)).eval()
    add_lora_to_encoder_attention(sam.image_encoder, rank=2)
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.qkv.lora_b.normal_(std=0.5)
    x = torch.randn(1, 3, 128, 128)
    expected = sam.image_encoder(x)
    path = save_official_checkpoint(sam, tmp_path / "exported.pth")
    assert any(isinstance(m, LoRALinear) for m in sam.modules())  # the trained model is left as it was
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(build_sam(TINY).state_dict())  # official key names, nothing else
    reloaded = build_sam(TINY, checkpoint=path).eval()
    assert torch.allclose(reloaded.image_encoder(x), expected, atol=1e-5)


def test_checkpoint_of_a_lora_run_loads_with_adapters_merged(tmp_path):
    """A Lightning-style checkpoint of a LoRA model (prefixed keys, adapters unmerged) builds the
    merged model directly: its size from the shapes, the adapters folded into plain weights."""
    torch.manual_seed(0)
    sam = randomized(build_sam(TINY)).eval()
    add_lora_to_encoder_attention(sam.image_encoder, rank=2, alpha=3.0)
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.qkv.lora_b.normal_(std=0.5)
    x = torch.randn(1, 3, 128, 128)
    expected = sam.image_encoder(x)
    state_dict = {f"sam.{k}": v for k, v in sam.state_dict().items()}
    torch.save({"state_dict": state_dict, "hyper_parameters": {"sam": asdict(TINY)}}, tmp_path / "last.ckpt")
    loaded = build_sam_from_checkpoint(tmp_path / "last.ckpt").eval()
    assert loaded.config == sam.config  # decoder heads (invisible in the shapes) from the saved config
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    assert torch.allclose(loaded.image_encoder(x), expected, atol=1e-5)


def test_official_format_checkpoint_builds_the_registry_size_it_matches(tmp_path):
    sam = build_sam_by_name("vit_t_256_small_decoder")  # 4 decoder heads: not visible in the shapes
    loaded = build_sam_from_checkpoint(save_official_checkpoint(sam, tmp_path / "small.pth"))
    assert loaded.config == SAM_CONFIGS["vit_t_256_small_decoder"]


def _pixel_hit_rate(sam, points: torch.Tensor) -> float:
    """How often the image->token attention's best-scoring pixel for a click (positional encodings
    only: no image content) is the embedding cell under the click, summed over heads."""
    pe = sam.prompt_encoder
    grid = pe.get_dense_pe()[0].flatten(1).T  # HW x C
    side = pe.image_embedding_size[0]
    click = pe.pe_layer.forward_with_coords(points[None] + 0.5, pe.input_image_size)[0]  # P x C
    attn = sam.mask_decoder.transformer.layers[0].cross_attn_image_to_token
    scores = attn.split_heads(attn.q_proj(grid)[None]) @ attn.split_heads(attn.k_proj(click)[None]).transpose(-1, -2)
    best = scores[0].sum(0).argmax(0)  # P: the pixel each click scores highest
    cell = (points[:, 1] // (pe.input_image_size[0] / side)) * side + points[:, 0] // (pe.input_image_size[1] / side)
    return (best == cell.long()).float().mean().item()


def test_tied_cross_attention_init_localises_clicks_from_the_start():
    torch.manual_seed(0)
    points = torch.rand(200, 2) * 128
    sam = build_sam(TINY)
    untied = _pixel_hit_rate(sam, points)
    assert tie_cross_attention_queries_and_keys(sam.mask_decoder, scale=2.0) == 2 * TINY.decoder_depth + 1
    for name, module in sam.mask_decoder.named_modules():
        if name.endswith("cross_attn_image_to_token"):
            assert torch.equal(module.q_proj.weight, module.k_proj.weight)
    tied = _pixel_hit_rate(sam, points)
    assert untied < 0.2 and tied > 0.6  # random projections ignore where the click is; tied ones do not


def test_optimiser_layer_decay_no_decay_groups_and_schedules():
    sam = build_sam(TINY)
    cfg = OptimConfig(lr=1.0, layer_decay=0.5, warmup_steps=10, milestones=(20, 30))
    optimizer, scheduler = build_optimizer(sam, cfg, depth=TINY.encoder_depth)
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = (group["initial_lr"], group["weight_decay"])
    named = dict(sam.named_parameters())
    assert lr_of[id(named["image_encoder.patch_embed.proj.weight"])] == (0.125, 0.1)  # 0.5 ** (2 + 1)
    assert lr_of[id(named["image_encoder.blocks.1.attn.qkv.weight"])] == (0.5, 0.1)
    assert lr_of[id(named["mask_decoder.iou_token.weight"])] == (1.0, 0.1)
    assert lr_of[id(named["image_encoder.blocks.0.norm1.weight"])][1] == 0.0
    assert lr_of[id(named["image_encoder.pos_embed"])][1] == 0.0
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0
    assert lr_factor(25, cfg) == pytest.approx(0.1) and lr_factor(35, cfg) == pytest.approx(0.01)
    cosine = OptimConfig(warmup_steps=0, schedule="cosine", total_steps=100)
    assert lr_factor(50, cosine) == pytest.approx(0.5) and lr_factor(100, cosine) == pytest.approx(0.0)


def test_encoder_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    sam = randomized(build_sam(TINY)).train()
    x = torch.randn(2, 3, 128, 128)
    grads = []
    for checkpointing in (False, True):
        sam.zero_grad()
        sam.image_encoder.activation_checkpointing = checkpointing
        sam.image_encoder(x).square().mean().backward()
        grads.append(sam.image_encoder.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_training_panels_draw_gt_and_prediction_over_the_image():
    from segany_train.training.overlays import render_training_panels

    image = torch.full((3, 16, 16), 100, dtype=torch.uint8)
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True  # the top-left 8x8 pixels at the input size
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    picture = render_training_panels(image, gt, pred, torch.tensor([[[12.0, 12.0]]]), torch.tensor([[1]]))
    assert picture.shape == (16, 32, 3) and picture.dtype == np.uint8
    gt_panel, pred_panel = picture[:, :16], picture[:, 16:]
    assert (gt_panel[:8, :8] != 100).any(axis=-1).all() and (gt_panel[8:, 8:] == 100).all()
    assert tuple(pred_panel[12, 12]) == (0, 255, 0)  # the foreground click, on an empty prediction
    assert (pred_panel[:8, :8] == 100).all()
