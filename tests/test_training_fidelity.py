"""Issue 15: the training step on the hardware users train on (CUDA, bf16) and fidelity to SAM / SAM 2.

No GPU here, so each test recreates the GPU condition on CPU: a default device that differs from the
generator's, a decoder whose outputs are bf16 while the embeddings are fp32 (what CUDA autocast
gives), CPU autocast for ops on its lower-precision list. `tests/gpu/` runs the real thing.
"""

import torch

from segany_train.training.rollout import RolloutConfig, iteration_schedule, run_rollout


def _gt_masks(n: int = 6, side: int = 32) -> torch.Tensor:
    gt = torch.zeros(n, side, side, dtype=torch.bool)
    for i in range(n):
        gt[i, 4 + i : 20 + i, 6 : 14 + 2 * i] = True
    return gt


def test_refinement_position_is_drawn_on_the_generators_device():
    # On CUDA the module's generator lives on the GPU and a draw without `device=` is a CPU draw,
    # which raises. Here the default device (meta) differs from the generator's (cpu): a draw that
    # ignores the generator's device lands on meta and cannot be read.
    cfg = RolloutConfig()
    with torch.device("meta"):
        schedule = iteration_schedule(cfg, torch.Generator().manual_seed(0))
    assert schedule == iteration_schedule(cfg, torch.Generator().manual_seed(0))
    assert schedule.count(False) == 2 and schedule[-1] is False


def test_rollout_keeps_the_decoders_dtype_when_it_differs_from_the_embeddings(tiny_sam):
    # CUDA autocast runs the decoder's matmuls in bf16 while the image embeddings stay fp32, and
    # (unlike CPU autocast) does not promote index_copy: the hook gives the decoder's outputs the
    # dtype they have there.
    tiny_sam.mask_decoder.register_forward_hook(lambda module, args, out: tuple(t.to(torch.bfloat16) for t in out))
    gt = _gt_masks()
    embeddings = torch.randn(2, 32, 8, 8)
    seen = []
    run_rollout(
        tiny_sam, embeddings, gt, torch.tensor([0, 0, 0, 1, 1, 1]), RolloutConfig(), seen.append,
        torch.Generator().manual_seed(0),
    )
    assert len(seen) == 11
    assert all(o.logits.dtype == torch.bfloat16 and o.iou_pred.dtype == torch.bfloat16 for o in seen)


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
        torch.testing.assert_close(out.logits[i], low[0].expand(3, -1, -1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.iou_pred[i], iou[0].expand(3), atol=1e-4, rtol=1e-4)


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
