"""Which prompts each rollout trains on: a seeded, stateless walk over the parquet rows.

The rows are read in the prompt-data format of the run's env (``prompt_dataset``: the env module's
``DATASET``, or the generic parquet format of ``envs.dataset``). Every row is validated when the
source is opened (a bad row stops the run before its first step, or is dropped on request). Rollout ``k`` takes rows ``k * rollout_batch_size ... (k + 1) * rollout_batch_size - 1`` of an endless
sequence of epochs, each epoch a permutation of the rows seeded by ``(seed, epoch)`` (or the file
order when shuffling is off). Being a pure function of ``k``, the walk needs no saved state: a
resumed run continues with exactly the prompts the uninterrupted run would have used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from envs.dataset import DEFAULT_DATASET, DatasetError, ParquetDataset, dataset_of, format_row_problems
from envs.loader import load_env_module
from trainer.config import TrainConfig, plugin_config


@dataclass(frozen=True)
class Prompt:
    row: int  # row index in the parquet file
    problem: str
    label: str
    images: list[Image.Image]


def prompt_dataset(cfg: TrainConfig) -> ParquetDataset:
    """The prompt-data format of the env that the run's plugin YAML names: its ``DATASET``, or the
    generic format when it declares none."""
    return dataset_of(load_env_module(plugin_config(cfg).rollout_interaction_env_path))


class PromptSource:
    """The usable rows of ``prompt_data`` in the format ``dataset`` (see :func:`prompt_dataset`),
    every row validated up front (``validate_parquet``): a bad row raises DatasetError naming every
    bad row, before the first step rather than at the step that reaches it, unless
    ``drop_bad_rows`` leaves them out (``dropped`` lists what was left out)."""

    def __init__(
        self,
        prompt_data: str | Path,
        *,
        seed: int,
        shuffle: bool = True,
        drop_bad_rows: bool = False,
        dataset: ParquetDataset = DEFAULT_DATASET,
    ) -> None:
        self.path = Path(prompt_data)
        self.dataset = dataset
        rows, self.problems = dataset.read_and_validate(self.path)
        bad = sorted({problem.index for problem in self.problems})
        if bad and not drop_bad_rows:
            raise DatasetError(
                f"{self.path}: {len(bad)} of {len(rows)} row(s) cannot be trained on:\n"
                f"{format_row_problems(self.problems)}\nFix or remove them (prepare_data.py --drop-bad-rows "
                "writes a clean copy), or train on the other rows with --drop-bad-rows "
                "(drop_bad_rows: true)",
                self.problems,
            )
        self.dropped = bad
        dropped = set(bad)
        self.rows = [row for row in rows if row.index not in dropped]
        if not self.rows:
            raise DatasetError(
                f"{self.path} has no usable rows"
                + (f" ({len(bad)} bad row(s) dropped)" if bad else "")
                + "; point prompt_data at a non-empty train.parquet",
                self.problems,
            )
        self.seed = seed
        self.shuffle = shuffle
        self._epoch_orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._epoch_orders:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(f"prompts:{self.seed}:{epoch}").shuffle(order)
            self._epoch_orders = {epoch: order}  # only the current epoch is ever needed again
        return self._epoch_orders[epoch]

    def row_indices(self, rollout_id: int, batch_size: int) -> list[int]:
        indices = []
        for g in range(rollout_id * batch_size, (rollout_id + 1) * batch_size):
            epoch, offset = divmod(g, len(self.rows))
            indices.append(self._order(epoch)[offset])
        return indices

    def batch(self, rollout_id: int, batch_size: int) -> list[Prompt]:
        prompts = []
        for index in self.row_indices(rollout_id, batch_size):
            row = self.rows[index]
            prompts.append(
                Prompt(
                    row=row.index, problem=row.problem, label=row.answer, images=self.dataset.load_images(row)
                )
            )
        return prompts
