"""SA-1B-format data: shard schema, writer, reader pipeline, synthetic corpus, COCO I/O.

The LightningDataModule lives in `segany_train.data.datamodule` (not imported here: it pulls in Lightning).
"""

from segany_train.data.pipeline import SkippedSampleWarning, collate_sam_samples, expand_shard_patterns, sam_sample_pipeline
from segany_train.data.sa1b import BadSample, decode_sample, encode_sample
from segany_train.data.sam_sample import SamSampleConfig, build_sam_sample
from segany_train.data.shard_writer import SA1BShardWriter, read_manifest

__all__ = [
    "BadSample",
    "SA1BShardWriter",
    "SamSampleConfig",
    "SkippedSampleWarning",
    "build_sam_sample",
    "collate_sam_samples",
    "decode_sample",
    "encode_sample",
    "expand_shard_patterns",
    "read_manifest",
    "sam_sample_pipeline",
]
