"""SA-1B-format data: shard schema, writer, reader pipeline, synthetic corpus, COCO I/O.

The LightningDataModule lives in `segany_train.data.datamodule` (not imported here: it pulls in Lightning).
"""

from segany_train.data.pipeline import SkippedSampleWarning, collate_training_samples, expand_shard_patterns, training_pipeline
from segany_train.data.sa1b import BadSample, decode_sample, encode_sample
from segany_train.data.shard_writer import SA1BShardWriter, read_manifest
from segany_train.data.training_sample import SampleConfig, build_training_sample

__all__ = [
    "BadSample",
    "SA1BShardWriter",
    "SampleConfig",
    "SkippedSampleWarning",
    "build_training_sample",
    "collate_training_samples",
    "decode_sample",
    "encode_sample",
    "expand_shard_patterns",
    "read_manifest",
    "training_pipeline",
]
