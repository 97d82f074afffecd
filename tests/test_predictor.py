"""SamPredictor: the official API's behaviour, batching, and clear errors for bad prompts."""

import numpy as np
import pytest
import torch

from segany_train import ResizeLongestSide, SamPredictor


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)


@pytest.fixture
def predictor(tiny_sam, image):
    p = SamPredictor(tiny_sam)
    p.set_image(image)
    return p


def test_prompting_before_an_image_is_set(tiny_sam):
    p = SamPredictor(tiny_sam)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        p.get_image_embedding()


def test_shapes_and_transform(predictor):
    assert isinstance(predictor.transform, ResizeLongestSide) and predictor.transform.target_length == 128
    assert predictor.original_size == (90, 120) and predictor.input_size == (96, 128)
    assert predictor.get_image_embedding().shape == (1, 32, 8, 8)
    masks, iou, low = predictor.predict(point_coords=np.array([[30, 40]]), point_labels=np.array([1]))
    assert masks.shape == (3, 90, 120) and masks.dtype == bool and iou.shape == (3,) and low.shape == (3, 32, 32)
    masks, iou, low = predictor.predict(box=np.array([10, 10, 80, 60]), multimask_output=False)
    assert masks.shape == (1, 90, 120) and iou.shape == (1,)
    # the low-res logits fed back as a mask prompt, as in interactive use
    masks, _, _ = predictor.predict(
        point_coords=np.array([[30, 40]]), point_labels=np.array([1]), mask_input=low, multimask_output=False
    )
    assert masks.shape == (1, 90, 120)


def test_predict_torch_batch_equals_single_prompts(predictor):
    boxes = np.array([[10, 10, 80, 60], [0, 0, 119, 89], [50, 20, 60, 30]])
    transformed = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), predictor.original_size)
    masks, iou, low = predictor.predict_torch(None, None, boxes=transformed, multimask_output=True, return_logits=True)
    assert masks.shape == (3, 3, 90, 120)
    for i, box in enumerate(boxes):
        m, s, lo = predictor.predict(box=box, return_logits=True)
        assert np.allclose(m, masks[i].numpy(), atol=1e-5) and np.allclose(s, iou[i].numpy(), atol=1e-5)
        assert np.allclose(lo, low[i].numpy(), atol=1e-5)


def test_new_image_replaces_cached_work(tiny_sam, predictor, image):
    other = np.ascontiguousarray(image[::-1])
    prompt = {"point_coords": np.array([[30, 40]]), "point_labels": np.array([1])}
    before, _, _ = predictor.predict(**prompt, return_logits=True)
    predictor.set_image(other)
    after, _, _ = predictor.predict(**prompt, return_logits=True)
    fresh = SamPredictor(tiny_sam)
    fresh.set_image(other)
    expected, _, _ = fresh.predict(**prompt, return_logits=True)
    assert np.allclose(after, expected, atol=1e-6) and not np.allclose(before, after)
    predictor.reset_image()
    assert not predictor.is_image_set and predictor.features is None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"point_coords": np.array([[30, 40]])}, "point_labels must be supplied"),
        ({"point_coords": np.array([30, 40]), "point_labels": np.array([1])}, "Nx2"),
        ({"point_coords": np.array([[30, 40]]), "point_labels": np.array([1, 0])}, "Nx2"),
        ({"point_coords": np.array([[30, 40]]), "point_labels": np.array([4])}, "point_labels"),
        ({"point_coords": np.array([[30, 40]]), "point_labels": np.array([-10])}, "point_labels"),
        ({"point_coords": np.array([[np.nan, 40]]), "point_labels": np.array([1])}, "point_coords"),
        ({"box": np.array([10, np.nan, 60, 60])}, "box"),
        ({"box": np.array([10, 10, 60, 60]), "mask_input": np.full((1, 32, 32), np.nan)}, "mask_input"),
        ({"box": np.array([80, 10, 10, 60])}, "x1 >= x0"),
        ({"box": np.array([10, 10, 60])}, "4 numbers"),
    ],
)
def test_bad_prompts_raise_clear_errors(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_bad_images_raise_clear_errors(tiny_sam):
    p = SamPredictor(tiny_sam)
    with pytest.raises(ValueError, match="HxWx3"):
        p.set_image(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="image_format"):
        p.set_image(np.zeros((10, 10, 3), dtype=np.uint8), image_format="RGBA")
    with pytest.raises(ValueError, match="longest side is 128"):
        p.set_torch_image(torch.zeros(1, 3, 64, 64), (64, 64))


def test_a_mask_prompt_of_the_wrong_size_is_named(predictor):
    with pytest.raises(ValueError, match="1x32x32"):
        predictor.predict(point_coords=np.array([[3, 4]]), point_labels=np.array([1]), mask_input=np.zeros((1, 64, 64)))


def test_bad_prompt_values_are_named_in_one_line(predictor):
    # issue 14: NaN coordinates or mask logits would give NaN scores silently
    with pytest.raises(ValueError, match=r"^box .*NaN") as error:
        predictor.predict(box=np.array([10, np.nan, 60, 60]))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^point_labels .*\{-1, 0, 1, 2, 3\}"):
        predictor.predict(point_coords=np.array([[30, 40]]), point_labels=np.array([7]))


def test_points_and_boxes_outside_the_image_are_accepted_with_a_warning(predictor):
    # the official predictor takes them as they are (they still say where the object is not)
    outside = np.array([[30, 40], [500, 40]])
    with pytest.warns(UserWarning, match="outside the 120x90"):
        masks, iou, low = predictor.predict(point_coords=outside, point_labels=np.array([1, 0]), return_logits=True)
    coords = predictor.transform.apply_coords(outside.astype(float), predictor.original_size)
    expected = predictor.predict_torch(
        torch.as_tensor(coords, dtype=torch.float)[None], torch.tensor([[1, 0]]), return_logits=True
    )
    assert np.allclose(masks, expected[0][0].numpy(), atol=1e-6) and np.allclose(iou, expected[1][0].numpy(), atol=1e-6)
    with pytest.warns(UserWarning, match="outside"):
        masks, _, _ = predictor.predict(box=np.array([300, 300, 400, 400]))
    assert masks.shape == (3, 90, 120)


def test_official_size_attributes_are_set(predictor):
    assert (predictor.orig_h, predictor.orig_w, predictor.input_h, predictor.input_w) == (90, 120, 96, 128)
    predictor.reset_image()
    assert predictor.orig_h is None and predictor.input_w is None


def test_sam_forward_accepts_mask_only_prompts(tiny_sam, image):
    # the official Sam.forward: no points and no boxes, only a mask prompt -> no sparse tokens
    x = torch.as_tensor(ResizeLongestSide(128).apply_image(image)).permute(2, 0, 1)
    masks_in = torch.randn(2, 1, 32, 32) * 4
    point_record = {"image": x, "original_size": (90, 120), "point_coords": torch.tensor([[[30.0, 40.0]]]),
                    "point_labels": torch.tensor([[1]])}
    with torch.no_grad():
        out = tiny_sam([{"image": x, "original_size": (90, 120), "mask_inputs": masks_in}, point_record], multimask_output=True)
        embedding = tiny_sam.image_encoder(tiny_sam.preprocess(x.float())[None])
        sparse, dense = tiny_sam.prompt_encoder(points=None, boxes=None, masks=masks_in)
        low, iou = tiny_sam.mask_decoder(embedding, tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert sparse.shape == (2, 0, 32)
    assert out[0]["low_res_logits"].shape == (2, 3, 32, 32) and out[0]["masks"].shape == (2, 3, 90, 120)
    torch.testing.assert_close(out[0]["low_res_logits"], low, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[0]["iou_predictions"], iou, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="point_coords"):
        tiny_sam([{"image": x, "original_size": (90, 120)}], multimask_output=True)


@pytest.mark.parametrize("input_size", [(128, 128), (128, 96)])
def test_postprocessing_skips_the_resize_to_the_same_size_bit_for_bit(tiny_sam, input_size):
    """An image already at the model's input scale skips the second resize; the official model's two
    resizes give the very same logits."""
    import torch.nn.functional as F

    low = torch.randn(2, 3, 32, 32) * 10
    side = tiny_sam.image_encoder.img_size
    both = F.interpolate(F.interpolate(low, (side, side), mode="bilinear", align_corners=False)[..., : input_size[0], : input_size[1]], input_size, mode="bilinear", align_corners=False)
    ours = tiny_sam.postprocess_masks(low, input_size, input_size)
    assert ours.is_contiguous() and torch.equal(ours, both)
