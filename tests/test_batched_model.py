"""Batched, differentiable forward: many images with their own prompts equal per-image forwards."""

import pytest
import torch

from segany_train.model import IGNORE_LABEL
from segany_train.model.attention import Attention

ATOL = 1e-5


def _per_image_reference(sam, record, multimask):
    """One image through the encoder, the official prompt-encoder call and a 1-image decoder call."""
    embedding = sam.image_encoder(sam.preprocess(record["image"])[None])
    points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
    sparse, dense = sam.prompt_encoder(points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs"))
    return sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask)


def _records(gen):
    img = lambda h, w: torch.rand(3, h, w, generator=gen) * 255  # noqa: E731
    return [
        {  # two single-point prompts
            "image": img(128, 96),
            "original_size": (256, 192),
            "point_coords": torch.rand(2, 1, 2, generator=gen) * 90,
            "point_labels": torch.ones(2, 1, dtype=torch.int),
        },
        {  # three box prompts
            "image": img(80, 128),
            "original_size": (80, 128),
            "boxes": torch.tensor([[10.0, 5.0, 60.0, 40.0], [0.0, 0.0, 127.0, 79.0], [30.0, 30.0, 35.0, 36.0]]),
        },
        {  # one prompt of two points, a box and a mask
            "image": img(128, 128),
            "original_size": (300, 300),
            "point_coords": torch.tensor([[[20.0, 30.0], [70.0, 90.0]]]),
            "point_labels": torch.tensor([[1, 0]]),
            "boxes": torch.tensor([[10.0, 10.0, 100.0, 110.0]]),
            "mask_inputs": torch.randn(1, 1, 32, 32, generator=gen),
        },
    ]


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_forward_equals_per_image_forwards(tiny_sam, multimask):
    records = _records(torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = tiny_sam(records, multimask_output=multimask)
        for record, out in zip(records, outputs):
            low_res, iou = _per_image_reference(tiny_sam, record, multimask)
            n = low_res.shape[0]
            assert out["low_res_logits"].shape == (n, 3 if multimask else 1, 32, 32)
            assert torch.allclose(out["low_res_logits"], low_res, atol=ATOL)
            assert torch.allclose(out["iou_predictions"], iou, atol=ATOL)
            assert out["masks"].shape == (n, 3 if multimask else 1, *record["original_size"])
            assert out["masks"].dtype == torch.bool


def test_forward_is_differentiable(tiny_sam):
    tiny_sam.train()
    outputs = tiny_sam(_records(torch.Generator().manual_seed(1)), multimask_output=True)
    loss = sum(o["low_res_logits"].sigmoid().mean() + o["iou_predictions"].sum() for o in outputs)
    loss.backward()
    for name in (
        "image_encoder.blocks.0.attn.qkv.weight",
        "image_encoder.blocks.1.attn.rel_pos_h",
        "image_encoder.pos_embed",
        "prompt_encoder.mask_downscaling.0.weight",
        "prompt_encoder.point_embeddings.2.weight",
        "mask_decoder.transformer.layers.0.cross_attn_image_to_token.q_proj.weight",
        "mask_decoder.output_upscaling.0.weight",
    ):
        grad = tiny_sam.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_ignored_padding_tokens_change_nothing(tiny_sam):
    emb = torch.randn(2, 32, 8, 8)
    coords = torch.tensor([[[10.0, 20.0], [0.0, 0.0]], [[50.0, 60.0], [70.0, 80.0]]])
    labels = torch.tensor([[1, -1], [2, 3]])
    padded_coords = torch.cat([coords, torch.full((2, 3, 2), 33.0)], dim=1)
    padded_labels = torch.cat([labels, torch.full((2, 3), IGNORE_LABEL)], dim=1)
    index = torch.tensor([1, 0])
    with torch.no_grad():
        a = tiny_sam.decode(emb, image_index=index, point_coords=coords, point_labels=labels, multimask_output=True)
        b = tiny_sam.decode(
            emb, image_index=index, point_coords=padded_coords, point_labels=padded_labels, multimask_output=True
        )
    assert torch.allclose(a[0], b[0], atol=ATOL) and torch.allclose(a[1], b[1], atol=ATOL)


def test_shared_image_path_equals_per_prompt_path(tiny_sam):
    """Without mask prompts the decoder shares first-layer work per image; the result must not change."""
    emb = torch.randn(2, 32, 8, 8)
    pe = tiny_sam.prompt_encoder
    coords, labels = torch.rand(5, 3, 2) * 128, torch.tensor([[1, 0, -1]] * 5)
    sparse = pe.embed_labelled_points(coords, labels)
    index = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        shared = tiny_sam.mask_decoder(emb, pe.get_dense_pe(), sparse, pe.no_mask_dense(5), True, image_index=index)
        # a materialised copy of the same dense embedding takes the per-prompt path
        dense = pe.no_mask_dense(5).clone()
        plain = tiny_sam.mask_decoder(emb, pe.get_dense_pe(), sparse, dense, True, image_index=index)
        tiny_sam.mask_decoder.prompt_chunk_size = 2  # decoded 2 prompts at a time, in 3 chunks
        chunked = tiny_sam.mask_decoder(emb, pe.get_dense_pe(), sparse, pe.no_mask_dense(5), True, image_index=index)
        chunked_plain = tiny_sam.mask_decoder(emb, pe.get_dense_pe(), sparse, dense, True, image_index=index)
    for other in (plain, chunked, chunked_plain):
        assert torch.allclose(shared[0], other[0], atol=ATOL) and torch.allclose(shared[1], other[1], atol=ATOL)


def test_image_index_is_required_when_ambiguous(tiny_sam):
    pe = tiny_sam.prompt_encoder
    sparse = pe.embed_labelled_points(torch.rand(3, 2, 2) * 100, torch.tensor([[1, -1]] * 3))
    with pytest.raises(ValueError, match="image_index"):
        tiny_sam.mask_decoder(torch.randn(2, 32, 8, 8), pe.get_dense_pe(), sparse, pe.no_mask_dense(3), True)


@pytest.mark.parametrize("heads,downsample", [(4, 2), (2, 1)])
def test_reassociated_attention_equals_plain_attention(heads, downsample):
    torch.manual_seed(0)
    attn = Attention(embedding_dim=32, num_heads=heads, downsample_rate=downsample)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.3)
        tokens, image = torch.randn(3, 5, 32), torch.randn(3, 40, 32)
        image_pe = torch.randn(3, 40, 32)
        mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True, False, True, True, True]])
        assert torch.allclose(attn.tokens_to_image(tokens, image + image_pe, image), attn(tokens, image + image_pe, image), atol=1e-5, rtol=1e-4)
        plain = attn(image + image_pe, tokens, tokens, mask)
        assert torch.allclose(attn.image_to_tokens(image + image_pe, tokens, tokens, mask), plain, atol=1e-5, rtol=1e-4)
        assert torch.allclose(
            attn.image_to_tokens(image + image_pe, tokens, tokens, mask, residual=image), plain + image, atol=1e-4
        )
        # one image shared by all three prompts
        one = image[0]
        shared = attn.shared_image_to_tokens(attn.q_proj(one), tokens, tokens, mask, residual=one)
        assert torch.allclose(shared, attn(one.expand(3, -1, -1), tokens, tokens, mask) + one, atol=1e-5, rtol=1e-4)


def test_cpu_chunks_hold_a_fixed_number_of_prompt_tokens(tiny_sam, monkeypatch):
    """Left unset, the CPU chunk holds 4 prompts of a 64x64 embedding: 64 prompts of a 16x16 one, so
    small models are not decoded in many tiny calls."""
    decoder, pe = tiny_sam.mask_decoder, tiny_sam.prompt_encoder
    calls = []
    heads = decoder._heads
    monkeypatch.setattr(decoder, "_heads", lambda hs, *rest: calls.append(hs.shape[0]) or heads(hs, *rest))
    for side, expected in ((16, [64, 16]), (64, [4] * 20)):
        calls.clear()
        n = sum(expected)
        emb = torch.randn(1, 32, side, side)
        sparse = pe.embed_labelled_points(torch.rand(n, 1, 2) * 128, torch.ones(n, 1, dtype=torch.int))
        with torch.no_grad():
            decoder(emb, torch.randn(1, 32, side, side), sparse, pe.no_mask_dense(1)[:, :, :1, :1], True)
        assert calls == expected
