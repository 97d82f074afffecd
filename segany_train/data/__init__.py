"""SA-1B-format data: shard schema, writer, reader pipeline, DataModule, synthetic corpus, COCO I/O."""

from segany_train.data.datamodule import SA1BDataModule
from segany_train.data.pipeline import SkippedSampleWarning, collate_training_samples, expand_shard_patterns, training_pipeline
from segany_train.data.sa1b import BadSample, decode_sample, encode_sample
from segany_train.data.shard_writer import SA1BShardWriter, read_manifest
from segany_train.data.training_sample import SampleConfig, build_training_sample

__all__ = [
    "BadSample",
    "SA1BDataModule",
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
