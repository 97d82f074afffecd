"""Two real processes (gloo): disjoint shards per rank, equal batch counts (unequal ones hang DDP) and
each rank its own random draws. RANK is not set: neither Lightning's launcher nor srun sets it."""

import json
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from segany_train.data.datamodule import SA1BDataModule
from segany_train.data.sam_sample import SamSampleConfig
from tests.shards import write_shards

SMALL = SamSampleConfig(image_size=128, mask_size=32)
AUGMENTED = SamSampleConfig(image_size=128, mask_size=32, max_masks=2, large_scale_jitter=True, horizontal_flip=True)


def _rank_main(rank: int, world: int, shard_dir: str, out_dir: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        for mode in ("split_repeat", "resampled"):
            dm = SA1BDataModule(
                train_shards=f"{shard_dir}/sa_*.tar",
                val_shards=f"{shard_dir}/sa_*.tar",
                sample=SMALL,
                batch_size=2,
                train_mode=mode,
            )
            dm.setup("fit")
            batches = list(dm.train_dataloader())
            result[mode] = {"batches": len(batches), "len": len(dm.train_dataloader()), "keys": [k for b in batches for k in b["keys"]]}
        result["val_keys"] = [k for b in dm.val_dataloader() for k in b["keys"]]
        # one shard: both ranks read the same images, so only the random draws can tell them apart
        one = SA1BDataModule(
            train_shards=f"{shard_dir}/sa_000000.tar", sample=AUGMENTED, samples_per_epoch=6, shuffle_buffer=0
        )
        one.setup("fit")
        result["draws"] = [[b["keys"][0], b["annotation_ids"].tolist(), int(b["image"].sum())] for b in one.train_dataloader()]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_disjoint_shards_and_equal_batch_counts(tmp_path):
    # 5 shards of 3 images over 2 ranks: split by node gives one rank 3 shards and the other 2
    write_shards(tmp_path / "shards", num_images=15, per_shard=3)
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_rank_main, args=(2, str(tmp_path / "shards"), str(out), str(tmp_path / "init")), nprocs=2, join=True)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    for mode in ("split_repeat", "resampled"):
        # 15 samples over 2 ranks: 7 each, in batches of 2 -> 4 batches on both ranks, as len() says
        assert r0[mode]["batches"] == r1[mode]["batches"] == r0[mode]["len"] == 4, mode
    split0, split1 = set(r0["split_repeat"]["keys"]), set(r1["split_repeat"]["keys"])
    assert split0 and split1 and not split0 & split1
    # validation reads every image exactly once across the ranks
    assert sorted(r0["val_keys"] + r1["val_keys"]) == sorted(f"sa_{i}" for i in range(15))
    assert not set(r0["val_keys"]) & set(r1["val_keys"])
    # masks chosen, jitter and flip differ between the ranks
    assert len(r0["draws"]) == len(r1["draws"]) == 6 and r0["draws"] != r1["draws"]
