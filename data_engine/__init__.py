"""SAM's data engine (SAM paper, section 4) as one resumable cycle, `segany-engine`: from a seed model,
stage 1 (assisted-manual) and stage 2 (semi-automatic, with box pre-fill) rounds annotated by the
simulated annotator or by people (COCO tasks, Label Studio), each followed by a retrain; stage 3
(fully automatic masks over the pool, also as a SLURM array with `segany-stage3`); a final retrain,
a control run, held-out evaluation of every model and the report.

It sits on top of `segany_train` and is its only user in this direction: nothing under
`segany_train/` imports this package (tests/test_layers.py). What the engine and `segany-train` or
`segany-serve` both need lives there: the seed model (`segany_train.model.seed_model`), held-out
evaluation with intervals (`segany_train.evaluation.holdout`) and the box detector with its pre-fill
(`segany_train.box_detection`).
"""
