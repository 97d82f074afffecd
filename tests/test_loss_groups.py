"""The loss per output group (3 outputs per single-point prompt, 1 per other prompt) equals the former
loss on N x 3 outputs, where each single-output prompt's one output was repeated three times: the
same totals, parts and gradients, without the copies. Run with -s for the times of both (64 masks at
256x256, the SAM recipe's low-res frame)."""

import time

import torch

from segany_train.prompting.rollout import OutputGroup, RolloutConfig, run_rollout
from segany_train.training.losses import LossWeights, grouped_sam_loss, sam_loss


def _gt_masks(n: int, side: int) -> torch.Tensor:
    gt = torch.zeros(n, side, side, dtype=torch.bool)
    for i in range(n):
        gt[i, 4 + i % 9 : side // 2 + i % 7, 6 : side // 3 + 2 * (i % 5)] = True
    return gt


def test_grouped_loss_equals_the_loss_on_repeated_single_outputs(tiny_sam):
    gt = _gt_masks(6, 32)
    embeddings = torch.randn(2, 32, 8, 8)
    image_index = torch.tensor([0, 0, 0, 1, 1, 1])
    seen = []
    cfg = RolloutConfig(num_iterations=2, num_correction_clicks=1, box_probability=0.5)
    run_rollout(tiny_sam, embeddings, gt, image_index, cfg, seen.append, torch.Generator().manual_seed(1))
    assert sorted(g.logits.shape[1] for g in seen[0].groups) == [1, 3]  # both kinds at the first iteration
    for out in seen:
        leaves = [OutputGroup(g.rows, g.logits.detach().requires_grad_(), g.iou_pred.detach().requires_grad_()) for g in out.groups]
        grouped = grouped_sam_loss(leaves, gt, LossWeights())
        grouped.total.backward()
        # the former computation: every prompt with 3 outputs, a single output repeated
        copies = [OutputGroup(g.rows, g.logits.detach().requires_grad_(), g.iou_pred.detach().requires_grad_()) for g in out.groups]
        expanded = type(out)(copies, out.shown, out.shown_iou_pred, out.step, out.interactions, out.point_coords, out.point_labels)
        logits, iou_pred = expanded.expanded()
        former = sam_loss(logits, iou_pred, gt, LossWeights())
        former.total.backward()
        for field in ("total", "focal", "dice", "iou"):
            torch.testing.assert_close(getattr(grouped, field), getattr(former, field), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grouped.true_iou, former.true_iou)
        torch.testing.assert_close(grouped.predicted_iou, iou_pred.gather(1, former.best[:, None])[:, 0])
        for mine, theirs in zip(leaves, copies):
            torch.testing.assert_close(mine.logits.grad, theirs.logits.grad, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(mine.iou_pred.grad, theirs.iou_pred.grad, rtol=1e-5, atol=1e-8)


def test_grouped_loss_time_at_the_recipes_resolution():
    torch.manual_seed(0)
    n, side = 64, 256
    gt = _gt_masks(n, side)
    multi = torch.arange(0, n, 2)  # half the prompts a single point (3 outputs), half more (1 output)
    single = torch.arange(1, n, 2)
    groups = [
        OutputGroup(multi, torch.randn(n // 2, 3, side, side, requires_grad=True), torch.rand(n // 2, 3, requires_grad=True)),
        OutputGroup(single, torch.randn(n // 2, 1, side, side, requires_grad=True), torch.rand(n // 2, 1, requires_grad=True)),
    ]
    logits = torch.empty(n, 3, side, side).index_copy(0, multi, groups[0].logits.detach()).index_copy(
        0, single, groups[1].logits.detach().expand(-1, 3, -1, -1)
    ).requires_grad_()
    iou_pred = torch.empty(n, 3).index_copy(0, multi, groups[0].iou_pred.detach()).index_copy(
        0, single, groups[1].iou_pred.detach().expand(-1, 3)
    ).requires_grad_()

    def timed(fn) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        return time.perf_counter() - start, loss.detach()

    grouped_s, grouped = timed(lambda: grouped_sam_loss(groups, gt, LossWeights()).total)
    former_s, former = timed(lambda: sam_loss(logits, iou_pred, gt, LossWeights()).total)
    torch.testing.assert_close(grouped, former, rtol=1e-5, atol=1e-5)
    print(f"\nloss + backward, 64 masks at 256x256 (half single-output): grouped {grouped_s:.3f} s, on 3 copies {former_s:.3f} s")
