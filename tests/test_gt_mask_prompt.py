"""SAM 2's GT-mask first prompt as this trainer runs it, a documented variant (docs/training.md).

SAM 2 passes a frame whose input is the GT mask through without decoding it (the mask itself,
as +-10 logits, is that frame's output, made for its video memory) and adds no correction click to
it. A single image has no memory to feed, so here the prompt is decoded like the others: the decoder
gets the GT as a +-10-logit mask prompt and returns one output, which is supervised; the next
iterations add correction clicks on the model's own mask, fed back as usual.
"""

import torch

from segany_train.prompting.rollout import RolloutConfig, run_rollout
from segany_train.training.losses import LossWeights, grouped_sam_loss


def test_a_gt_mask_prompt_is_decoded_supervised_and_then_corrected(tiny_sam):
    n = 4
    gt = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i in range(n):
        gt[i, 4 + 2 * i : 20, 6 : 14 + 3 * i] = True
    calls, seen = [], []
    decode = tiny_sam.decode
    tiny_sam.decode = lambda *args, **kwargs: calls.append(kwargs) or decode(*args, **kwargs)
    embeddings = torch.randn(1, 32, 8, 8, requires_grad=True)
    cfg = RolloutConfig(num_iterations=3, num_correction_clicks=2, gt_mask_prompt_probability=1.0)
    run_rollout(tiny_sam, embeddings, gt, torch.zeros(n, dtype=torch.long), cfg, seen.append, torch.Generator().manual_seed(0))
    first = calls[0]
    assert first["multimask_output"] is False  # one output
    torch.testing.assert_close(first["mask_inputs"], (gt.float() * 2 - 1)[:, None] * 10)  # the GT as +-10 logits
    assert not (first["point_labels"] >= 0).any()  # no point, no box
    loss = grouped_sam_loss(seen[0].groups, gt, LossWeights())
    loss.total.backward()
    assert embeddings.grad.abs().sum() > 0  # supervised: SAM 2 would not decode this frame at all
    # the next iteration adds a correction click (one point: 3 outputs) and feeds back the model's mask
    second = [c for c in calls if c["mask_inputs"] is not None and c["point_labels"].shape[1] == 3]
    assert second and all(c["multimask_output"] for c in second)
    torch.testing.assert_close(torch.cat([c["mask_inputs"] for c in second]), seen[0].shown[:, None])
