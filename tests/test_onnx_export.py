"""ONNX export: the exported model, run in ONNX Runtime, against PyTorch and the official outputs."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import TINY, parity_config, randomized

from segany_train import SamPredictor
from segany_train.export.onnx_export import export_onnx, main, quantize_onnx
from segany_train.model import build_sam
from segany_train.model.transforms import ResizeLongestSide

TOL = 1e-3
ORIGINAL_SIZE = (300, 200)  # H, W: a portrait image, so the crop of the padding matters
OUTPUT_SCALE = 100.0


def session(path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, embedding, coords, labels, *, mask_input=None, original_size=ORIGINAL_SIZE):
    """The official app's call: coords Nx2 and labels N already in the resized frame."""
    h, w = embedding.shape[-2:]
    inputs = {
        "image_embeddings": embedding.numpy(),
        "point_coords": np.asarray(coords, dtype=np.float32)[None],
        "point_labels": np.asarray(labels, dtype=np.float32)[None],
        "mask_input": np.zeros((1, 1, 4 * h, 4 * w), np.float32) if mask_input is None else mask_input.numpy(),
        "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
        "orig_im_size": np.array(original_size, np.float32),
    }
    return sess.run(None, inputs)


@pytest.fixture(scope="module")
def sam():
    """The tiny model with random weights, its output layers scaled so that logits are O(1-10) (plain
    random weights give logits of ~0.05, against which an absolute 1e-3 would hide a 2% error). Seed 6
    gives masks with both signs, so that thresholded masks can be compared."""
    model = randomized(build_sam(TINY), seed=6).eval()
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(OUTPUT_SCALE)
            mlp.layers[-1].bias.mul_(OUTPUT_SCALE)
    return model


@pytest.fixture(scope="module")
def predictor(sam):
    p = SamPredictor(sam)
    p.set_image(np.random.default_rng(0).integers(0, 255, (*ORIGINAL_SIZE, 3), dtype=np.uint8))
    assert p.input_size == (128, 85)
    return p


@pytest.fixture(scope="module")
def model_path(sam, tmp_path_factory):
    return export_onnx(sam, tmp_path_factory.mktemp("onnx") / "sam.onnx")


@pytest.fixture(scope="module")
def ort_session(model_path):
    return session(model_path)


def predict(predictor, coords, labels, **kwargs):
    """SamPredictor.predict_torch for one prompt in the resized frame (logits)."""
    masks, iou, low = predictor.predict_torch(
        torch.as_tensor(coords, dtype=torch.float)[None] if coords is not None else None,
        torch.as_tensor(labels)[None] if labels is not None else None,
        return_logits=True,
        **kwargs,
    )
    return masks.numpy(), iou.numpy(), low.numpy()


def assert_close(onnx_outputs, torch_outputs, tokens, tol=TOL):
    for got, want in zip(onnx_outputs, torch_outputs):
        np.testing.assert_allclose(got[:, tokens], want, atol=tol, rtol=0)


def test_names_shapes_and_types_are_the_official_ones(ort_session, predictor):
    inputs = {i.name: (i.shape, i.type) for i in ort_session.get_inputs()}
    assert inputs == {
        "image_embeddings": ([1, 32, 8, 8], "tensor(float)"),
        "point_coords": ([1, "num_points", 2], "tensor(float)"),
        "point_labels": ([1, "num_points"], "tensor(float)"),
        "mask_input": ([1, 1, 32, 32], "tensor(float)"),
        "has_mask_input": ([1], "tensor(float)"),
        "orig_im_size": ([2], "tensor(float)"),
    }
    assert [i.name for i in ort_session.get_inputs()] == list(inputs)  # official order too
    assert [o.name for o in ort_session.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]
    masks, iou, low = run(ort_session, predictor.features, [[40, 50], [0, 0]], [1, -1])
    assert masks.shape == (1, 4, *ORIGINAL_SIZE) and masks.dtype == np.float32
    assert iou.shape == (1, 4) and low.shape == (1, 4, 32, 32)


def test_points_with_pad_match_predictor(ort_session, predictor):
    points = np.array([[40.0, 50.0], [70.5, 100.0]])
    onnx = run(ort_session, predictor.features, [*points, [0, 0]], [1, 0, -1])  # as the official app sends
    assert_close(onnx, predict(predictor, points, [1, 0], multimask_output=True), slice(1, 4))
    assert_close(onnx, predict(predictor, points, [1, 0], multimask_output=False), slice(0, 1))


def test_box_and_point_match_predictor(ort_session, predictor):
    point, box = np.array([[40.0, 50.0]]), np.array([[20.0, 30.0, 70.0, 110.0]])
    onnx = run(ort_session, predictor.features, [*point, box[0, :2], box[0, 2:]], [1, 2, 3])  # no pad with a box
    want = predict(predictor, point, [1], boxes=torch.as_tensor(box, dtype=torch.float), multimask_output=False)
    assert_close(onnx, want, slice(0, 1))
    box_only = run(ort_session, predictor.features, box.reshape(2, 2), [2, 3])
    want = predict(predictor, None, None, boxes=torch.as_tensor(box, dtype=torch.float), multimask_output=True)
    assert_close(box_only, want, slice(1, 4))


def test_mask_input_is_used_only_with_has_mask_input(ort_session, predictor):
    point = np.array([[40.0, 50.0]])
    _, _, low = predict(predictor, point, [1], multimask_output=False)
    mask = torch.as_tensor(low)  # 1x1x32x32, the previous prediction fed back
    onnx = run(ort_session, predictor.features, [*point, [0, 0]], [1, -1], mask_input=mask)
    want = predict(predictor, point, [1], mask_input=mask, multimask_output=False)
    assert_close(onnx, want, slice(0, 1))
    no_mask = run(ort_session, predictor.features, [*point, [0, 0]], [1, -1])
    assert np.abs(no_mask[2] - onnx[2]).max() > 0.1  # the mask prompt changes the answer...
    inputs = {i.name: None for i in ort_session.get_inputs()}
    inputs.update(
        image_embeddings=predictor.features.numpy(),
        point_coords=np.array([[[40.0, 50.0], [0, 0]]], np.float32),
        point_labels=np.array([[1, -1]], np.float32),
        mask_input=mask.numpy() * 100,
        has_mask_input=np.zeros(1, np.float32),
        orig_im_size=np.array(ORIGINAL_SIZE, np.float32),
    )
    ignored = ort_session.run(None, inputs)  # ...and is ignored with has_mask_input 0
    for got, want in zip(ignored, no_mask):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_points", [1, 4, 7])
def test_number_of_points_is_dynamic(ort_session, sam, predictor, num_points):
    gen = torch.Generator().manual_seed(num_points)
    coords = torch.rand(1, num_points, 2, generator=gen) * torch.tensor([85.0, 128.0])
    labels = torch.randint(-1, 4, (1, num_points), generator=gen)
    onnx = run(ort_session, predictor.features, coords[0], labels[0])
    for multimask, tokens in ((True, slice(1, 4)), (False, slice(0, 1))):
        with torch.no_grad():
            low, iou = sam.decode(
                predictor.features,
                image_index=None,
                point_coords=coords,
                point_labels=labels,
                multimask_output=multimask,
            )
            masks = sam.postprocess_masks(low, predictor.input_size, ORIGINAL_SIZE)
        assert_close(onnx, (masks.numpy(), iou.numpy(), low.numpy()), tokens)


@pytest.mark.parametrize("original_size", [(300, 200), (64, 250), (1001, 999)])
def test_output_size_follows_orig_im_size(ort_session, sam, predictor, original_size):
    masks, _, low = run(ort_session, predictor.features, [[40, 50], [0, 0]], [1, -1], original_size=original_size)
    input_size = ResizeLongestSide(128).get_preprocess_shape(*original_size, 128)
    want = sam.postprocess_masks(torch.as_tensor(low), input_size, original_size)
    assert masks.shape == (1, 4, *original_size)
    np.testing.assert_allclose(masks, want.numpy(), atol=TOL, rtol=0)


def test_return_single_mask_picks_as_officially(sam, predictor, ort_session, tmp_path):
    single = session(export_onnx(sam, tmp_path / "single.onnx", return_single_mask=True))
    # one point and its pad: the ambiguity mask with the best predicted IoU
    one_point = ([[40, 50], [0, 0]], [1, -1])
    masks, iou, low = run(single, predictor.features, *one_point)
    all_masks, all_iou, all_low = run(ort_session, predictor.features, *one_point)
    best = 1 + int(np.argmax(all_iou[0, 1:]))
    assert masks.shape == (1, 1, *ORIGINAL_SIZE) and iou.shape == (1, 1) and low.shape == (1, 1, 32, 32)
    np.testing.assert_allclose(low[0, 0], all_low[0, best], atol=TOL, rtol=0)
    np.testing.assert_allclose(masks[0, 0], all_masks[0, best], atol=TOL, rtol=0)
    np.testing.assert_allclose(iou[0, 0], all_iou[0, best], atol=TOL, rtol=0)
    # three points: the single-mask token 0, whatever the scores
    three = ([[40, 50], [60, 20], [0, 0]], [1, 1, -1])
    _, iou, low = run(single, predictor.features, *three)
    _, all_iou, all_low = run(ort_session, predictor.features, *three)
    np.testing.assert_allclose(low[0, 0], all_low[0, 0], atol=TOL, rtol=0)
    np.testing.assert_allclose(iou[0, 0], all_iou[0, 0], atol=TOL, rtol=0)


def test_stability_score_replaces_iou(sam, predictor, tmp_path):
    sess = session(export_onnx(sam, tmp_path / "stability.onnx", use_stability_score=True))
    _, score, low = run(sess, predictor.features, [[40, 50], [0, 0]], [1, -1])
    want = (low > 1.0).sum((-2, -1)) / (low > -1.0).sum((-2, -1))
    np.testing.assert_allclose(score, want, atol=1e-6, rtol=0)


def test_gelu_approximate_leaves_the_model_alone(sam, predictor, ort_session, tmp_path):
    sam.train()
    try:
        sess = session(export_onnx(sam, tmp_path / "tanh.onnx", gelu_approximate=True))
        assert sam.mask_decoder.training  # exported from a copy: the model keeps its mode...
    finally:
        sam.eval()
    gelus = [m for m in sam.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)  # ...and its exact GELU
    prompt = ([[40, 50], [0, 0]], [1, -1])
    approx, exact = run(sess, predictor.features, *prompt)[2], run(ort_session, predictor.features, *prompt)[2]
    assert 0 < np.abs(approx - exact).max() < 0.05 * np.abs(exact).max()


def test_quantized_model_runs_and_stays_close(model_path, predictor, ort_session, tmp_path):
    quantized_path = quantize_onnx(model_path, tmp_path / "sam_q.onnx")
    op_types = {node.op_type for node in onnx.load(quantized_path).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= op_types  # int8 matmuls took the float ones' place
    quantized = session(quantized_path)
    prompt = ([[40, 50], [70, 100], [0, 0]], [1, 0, -1])
    masks_q, iou_q, low_q = run(quantized, predictor.features, *prompt)
    masks, iou, low = run(ort_session, predictor.features, *prompt)
    # 8-bit weights and activations quantised per tensor at run time: every matmul carries a rounding
    # error of about 1/255 of its inputs' range, so outputs agree to a few percent of their range, not
    # to 1e-3; what an application uses (the thresholded masks, the IoU ranking) barely changes.
    assert np.abs(low_q - low).max() < 0.05 * np.abs(low).max()
    assert np.abs(iou_q - iou).max() < 0.05 * np.abs(iou).max()
    assert ((masks_q > 0) == (masks > 0)).mean() > 0.97


@pytest.fixture(scope="module")
def parity_session(parity, tmp_path_factory):
    sam = build_sam(parity_config(parity), checkpoint=parity["state_dict"]).eval()
    return session(export_onnx(sam, tmp_path_factory.mktemp("parity") / "parity.onnx"))


@pytest.mark.parametrize("case_index", range(4))
def test_official_outputs_are_reproduced(parity, parity_session, case_index):
    """The official predictor's outputs (fixture) from the official image embedding, through ONNX."""
    sess = parity_session
    case = parity["cases"][case_index]
    kwargs = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in case["kwargs"].items()}
    original_size = tuple(parity["image"].shape[:2])
    coords, labels = [], []
    if "point_coords" in kwargs:
        coords += list(kwargs["point_coords"])
        labels += list(kwargs["point_labels"])
    if "box" in kwargs:
        coords += list(kwargs["box"].reshape(2, 2))
        labels += [2, 3]
    else:
        coords.append([0.0, 0.0])
        labels.append(-1)
    coords = ResizeLongestSide(parity["config"]["img"]).apply_coords(np.array(coords), original_size)
    mask = torch.as_tensor(kwargs["mask_input"])[None] if "mask_input" in kwargs else None
    onnx = run(sess, parity["image_embedding"], coords, labels, mask_input=mask, original_size=original_size)
    tokens = slice(1, 4) if kwargs["multimask_output"] else slice(0, 1)
    want = [case[k].numpy()[None] for k in ("masks", "iou", "low_res_logits")]
    assert_close(onnx, want, tokens)


def test_command_line_exports_a_trained_checkpoint(sam, predictor, ort_session, tmp_path, capsys):
    from dataclasses import asdict

    checkpoint = tmp_path / "last.ckpt"  # a segany-train checkpoint: the run's config is saved with it
    state = {f"model.sam.{k}": v for k, v in sam.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"sam": asdict(TINY)}}, checkpoint)
    out, quantized = tmp_path / "cli.onnx", tmp_path / "cli_q.onnx"
    main(["--checkpoint", str(checkpoint), "--output", str(out), "--quantize-out", str(quantized)])
    assert "wrote" in capsys.readouterr().out and quantized.is_file()
    prompt = ([[40, 50], [0, 0]], [1, -1])
    for got, want in zip(run(session(out), predictor.features, *prompt), run(ort_session, predictor.features, *prompt)):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{missing}"], "SAM checkpoint not found"),
        (["--checkpoint", "{garbage}"], "is not a readable SAM checkpoint"),
        (["--checkpoint", "{no_sam}"], "holds no SAM weights"),
        (["--model-type", "vit_b", "--opset", "13"], "--opset must be >= 14"),
        ([], "give --checkpoint, --model-type"),
    ],
)
def test_command_line_errors_are_one_line(tmp_path, capsys, args, message):
    files = {"missing": tmp_path / "missing.pth", "garbage": tmp_path / "garbage.pth", "no_sam": tmp_path / "other.pth"}
    files["garbage"].write_text("not a checkpoint")
    torch.save({"weight": torch.zeros(2)}, files["no_sam"])
    args = [a.format(**files) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--output", str(tmp_path / "x.onnx")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("segany-export-onnx: error:") and message in error
    assert not (tmp_path / "x.onnx").exists()
