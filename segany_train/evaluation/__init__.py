"""Evaluation of SAM models: the interactive click protocol (mIoU after k clicks, NoC) and COCO AP of
automatic masks, and the segany-eval command (`segany_train.evaluation.cli`)."""
