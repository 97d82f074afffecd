"""Writing a trained SAM for other tools: ONNX (`segany-export-onnx`: prompt encoder + mask decoder
with postprocessing, traced from the decoder's reference path) and `segany-export` (official .pth,
Hugging Face folder and ONNX from one checkpoint, each loaded back and checked)."""
