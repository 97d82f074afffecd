"""Lightning's warnings and tips that do not apply to this project's training, silenced where they arise.

Each filter names one message, matched from its start, and holds only inside the `with` block around
the Trainer (`training.run.train`, the data engine's retrains): any other warning still shows.

- "Using ModelCheckpoint with manual optimization and every_n_train_steps": the training module
  optimises manually (several backward passes per step, `training/module.py`); a checkpoint holding
  the weights after the step is the one wanted (resuming continues from there).
- "`isinstance(treespec, LeafSpec)` is deprecated": torch's deprecation of an API Lightning's own
  `_pytree.py` calls, once per fit; nothing in this project uses it.
- "Your `IterableDataset` has `__len__` defined": the DataModule's streams give every worker its own
  share of the shards and a fixed length per rank (`data/datamodule.py`), which is what the warning
  asks for.
- "Found N module(s) in eval mode at the start of training": `model.freeze` puts the frozen parts in
  eval mode on purpose (no drop path in a frozen encoder, `training/run.build_model`).
- the "💡 Tip: ... litlogger" line: an advertisement, logged (not warned) once per Trainer.

The data engine's retrains continue one training run through the rounds, each in a directory of its
own and on a round's few images; `continued_run_warnings_filtered` also silences what that design
makes Lightning say every round: the checkpoint directory changed since the resumed checkpoint, the
resumed checkpoint ended inside an epoch of an unresumable loader (each round reads new shards from
their start), and an epoch shorter than the logging interval (metrics are logged by global step, so
they are logged across epochs anyway).
"""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message prefix as a regular expression, category)
TRAINING_WARNINGS = (
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"Your `IterableDataset` has `__len__` defined", UserWarning),
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
)
CONTINUED_RUN_WARNINGS = (
    (r"The dirpath has changed from", UserWarning),
    (r"You're resuming from a checkpoint that ended before the epoch ended", UserWarning),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning),
)
# the logger Lightning's rank_zero_info writes through (`lightning.pytorch.utilities.rank_zero`)
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
LOGGED_TIPS = ("💡 Tip: For seamless cloud logging",)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LOGGED_TIPS)


@contextmanager
def _filtered(messages: tuple[tuple[str, type[Warning]], ...]) -> Iterator[None]:
    with warnings.catch_warnings():
        for message, category in messages:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextmanager
def lightning_warnings_filtered() -> Iterator[None]:
    """Inside: TRAINING_WARNINGS are ignored and the litlogger tip is not logged."""
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    tips = _DropTips()
    logger.addFilter(tips)
    try:
        with _filtered(TRAINING_WARNINGS):
            yield
    finally:
        logger.removeFilter(tips)


@contextmanager
def continued_run_warnings_filtered() -> Iterator[None]:
    """Inside: CONTINUED_RUN_WARNINGS are ignored (the data engine's retrains)."""
    with _filtered(CONTINUED_RUN_WARNINGS):
        yield
