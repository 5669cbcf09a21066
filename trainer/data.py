"""Which prompts each rollout trains on: a seeded, stateless walk over the parquet rows.

Rollout ``k`` takes rows ``k * rollout_batch_size ... (k + 1) * rollout_batch_size - 1`` of an endless
sequence of epochs, each epoch a permutation of the rows seeded by ``(seed, epoch)`` (or the file
order when shuffling is off). Being a pure function of ``k``, the walk needs no saved state: a
resumed run continues with exactly the prompts the uninterrupted run would have used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class Prompt:
    row: int  # row index in the parquet file
    problem: str
    label: str
    images: list[Image.Image]


class PromptSource:
    def __init__(self, prompt_data: str | Path, *, seed: int, shuffle: bool = True) -> None:
        from envs.geo3k.dataset import read_geo3k_parquet

        self.path = Path(prompt_data)
        self.rows = read_geo3k_parquet(self.path)
        if not self.rows:
            raise ValueError(f"{self.path} has no rows; point prompt_data at a non-empty train.parquet")
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
        from envs.geo3k.dataset import load_row_images

        prompts = []
        for index in self.row_indices(rollout_id, batch_size):
            row = self.rows[index]
            prompts.append(
                Prompt(row=index, problem=row.problem, label=row.answer, images=load_row_images(row))
            )
        return prompts
