"""Our model and SamPredictor against outputs of the official segment-anything 1.0 implementation, and
the decoder's fast path against its reference path (the official algorithm)."""

import numpy as np
import pytest
import torch

from segany_train import SamPredictor
from segany_train.model import IGNORE_LABEL

TOL = 1e-4


def test_image_embedding_matches_official(parity, parity_sam):
    predictor = SamPredictor(parity_sam)
    predictor.set_image(parity["image"].numpy())
    assert predictor.input_size == tuple(parity["input_size"])
    embedding = predictor.get_image_embedding()
    assert embedding.shape == parity["image_embedding"].shape
    assert (embedding - parity["image_embedding"]).abs().max().item() < TOL


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("case_index", range(4))
def test_predict_matches_official(parity, parity_sam, case_index, reference):
    """Through the decoder's fast path and through its reference path (what the ONNX export traces)."""
    case = parity["cases"][case_index]
    parity_sam.mask_decoder.reference = reference
    predictor = SamPredictor(parity_sam)
    predictor.set_image(parity["image"].numpy())
    kwargs = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in case["kwargs"].items()}
    masks, iou, low_res = predictor.predict(**kwargs, return_logits=True)
    assert masks.shape == tuple(case["masks"].shape)
    assert iou.shape == tuple(case["iou"].shape)
    assert low_res.shape == tuple(case["low_res_logits"].shape)
    np.testing.assert_allclose(masks, case["masks"].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(iou, case["iou"].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(low_res, case["low_res_logits"].numpy(), atol=TOL, rtol=0)
    # thresholded masks, as the official predict returns them by default
    binary, _, _ = predictor.predict(**kwargs)
    assert binary.dtype == bool
    np.testing.assert_array_equal(binary, masks > 0.0)


def test_bgr_input_is_flipped(parity, parity_sam):
    predictor = SamPredictor(parity_sam)
    predictor.set_image(parity["image"].numpy()[..., ::-1].copy(), image_format="BGR")
    assert (predictor.get_image_embedding() - parity["image_embedding"]).abs().max().item() < TOL


def test_fast_path_equals_reference_path(tiny_sam):
    """The decoder's fast path (re-associated attention, shared image keys, prompt chunks, sub-pixel
    upscaling) against its reference path on the same weights: points, boxes, mask prompts, single
    and multimask outputs, prompts of two images with padding, keys shared across calls."""
    sam, decoder = tiny_sam, tiny_sam.mask_decoder
    gen = torch.Generator().manual_seed(0)
    predictor = SamPredictor(sam)
    predictor.set_image((torch.rand(96, 128, 3, generator=gen) * 255).to(torch.uint8).numpy())
    mask = torch.randn(1, 1, 32, 32, generator=gen)
    box = torch.tensor([[10.0, 20.0, 90.0, 70.0]])
    point, label = torch.tensor([[[40.0, 30.0]]]), torch.tensor([[1]])
    prompts = [
        {"point_coords": point, "point_labels": label},
        {"point_coords": torch.rand(5, 3, 2, generator=gen) * 96, "point_labels": torch.tensor([[1, 0, 1]] * 5)},
        {"point_coords": None, "point_labels": None, "boxes": box},
        {"point_coords": point, "point_labels": label, "boxes": box},
        {"point_coords": point, "point_labels": label, "mask_input": mask},
    ]
    embeddings = torch.randn(2, 32, 8, 8, generator=gen)
    coords = torch.rand(6, 3, 2, generator=gen) * 128
    labels = torch.tensor([[1, -1, IGNORE_LABEL], [2, 3, 1], [0, 1, IGNORE_LABEL]] * 2)
    decode = {
        "image_embeddings": embeddings,
        "image_index": torch.tensor([1, 0, 1, 1, 0, 0]),
        "point_coords": coords,
        "point_labels": labels,
    }
    masks = {"mask_inputs": torch.randn(6, 1, 32, 32, generator=gen), "has_mask_input": torch.arange(6) % 2 == 0}
    pe = sam.prompt_encoder
    shared = decoder.prepare_shared_keys(embeddings, pe.get_dense_pe(), pe.no_mask_dense(1)[:, :, :1, :1])
    decoder.prompt_chunk_size = 4  # the 6 prompts in two chunks

    def run_all() -> list[torch.Tensor]:
        outputs = []
        for multimask in (True, False):
            for prompt in prompts:
                outputs += predictor.predict_torch(**prompt, multimask_output=multimask, return_logits=True)
            outputs += sam.decode(**decode, multimask_output=multimask)
            outputs += sam.decode(**decode, multimask_output=multimask, shared_keys=shared)
            outputs += sam.decode(**decode, multimask_output=multimask, **masks)
        return outputs

    with torch.no_grad():
        fast = run_all()
        with decoder.reference_path():
            reference = run_all()
    assert not decoder.reference
    for got, want in zip(fast, reference, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_few_prompts_skip_the_shared_keys_and_match_the_reference(tiny_sam, monkeypatch):
    """With too few prompts per image to pay for the shared image keys (as for one prompt on vit_b),
    the fast path folds the first layer's cross-attentions into the tokens instead: same outputs."""
    sam, decoder = tiny_sam, tiny_sam.mask_decoder
    gen = torch.Generator().manual_seed(1)
    decode = {
        "image_embeddings": torch.randn(2, 32, 8, 8, generator=gen),
        "image_index": torch.tensor([1, 0, 1]),
        "point_coords": torch.rand(3, 2, 2, generator=gen) * 128,
        "point_labels": torch.tensor([[1, 0], [1, -1], [2, 3]]),
    }
    monkeypatch.setattr(decoder, "_sharing_pays", lambda *args: False)
    monkeypatch.setattr(decoder, "prepare_shared_keys", None)  # must not be called
    with torch.no_grad():
        for multimask in (True, False):
            fast = sam.decode(**decode, multimask_output=multimask)
            with decoder.reference_path():
                reference = sam.decode(**decode, multimask_output=multimask)
            for got, want in zip(fast, reference, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
