"""Step-indexed batch sampling: a pure function from (seed, step) to the items and seeds of a batch.

Training is counted in optimisation steps, not epochs (docs/method.md §9: the released U2PL trainer ran one
step per epoch). ``StepBatchSampler`` therefore yields one batch per step from a continuous stream of
per-epoch permutations, and pairs every item with a sample seed derived from (seed, step, slot). No
state is carried between steps beyond the step number, so resuming at ``start_step`` replays exactly
what an uninterrupted run would have seen, on any number of workers or ranks. ``eval_batches`` splits
an evaluation set across ranks so that every image is evaluated exactly once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

_SEED_MASK = (1 << 63) - 1  # torch.Generator.manual_seed accepts any non-negative 63-bit int


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints / strings, stable across processes, platforms and versions.

    Python's ``hash`` is salted per process, so a cryptographic hash of the tuple's repr is used.
    Frameworks use it for batch-level draws too, e.g. ``derive_seed(seed, "cutmix", step)``.
    """
    # int() first: numpy 2 integers repr as "np.int64(5)" and would give a different seed than 5.
    key = tuple(p if isinstance(p, str) else int(p) for p in parts)
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def make_generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


class StepBatchSampler:
    """Yields, for each step t in ``[start_step, total_steps)``, a list of ``(index, sample_seed)``.

    The global batch of step t holds stream positions ``[t*G, (t+1)*G)`` with ``G = batch_size *
    world_size``; stream position p is item ``perm_e[p mod N]`` of epoch ``e = p // N``, where
    ``perm_e`` is drawn from a generator seeded by (seed, e). Epochs are concatenated, so every step
    has a full batch and no item is dropped. Slot s of the global batch gets seed
    ``derive_seed(seed, "sample", t, s)``; rank r takes slots ``[r*B, (r+1)*B)``. Hence the union over
    ranks equals the batch of a single process with ``batch_size=G``. ``total_steps=None`` is endless.
    Pass it as ``batch_sampler=`` to a ``DataLoader`` over a ``LabeledDataset`` / ``UnlabeledDataset``.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0,
                 total_steps: int | None = None, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError(f"num_items={num_items}: need at least one item")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: need >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if start_step < 0 or (total_steps is not None and total_steps < start_step):
            raise ValueError(f"start_step={start_step}, total_steps={total_steps}: need "
                             "0 <= start_step <= total_steps")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self._perm_cache: dict[int, list[int]] = {}

    def epoch_permutation(self, epoch: int) -> list[int]:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            g = make_generator(self.seed, "epoch", epoch)
            perm = torch.randperm(self.num_items, generator=g).tolist()
            if len(self._perm_cache) >= 2:  # a step straddles at most two epochs when G <= N
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = perm
        return perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's ``(index, sample_seed)`` pairs for ``step``."""
        global_size = self.batch_size * self.world_size
        first_slot = self.rank * self.batch_size
        out = []
        for slot in range(first_slot, first_slot + self.batch_size):
            p = step * global_size + slot
            epoch, pos = divmod(p, self.num_items)
            out.append((self.epoch_permutation(epoch)[pos], derive_seed(self.seed, "sample", step, slot)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("StepBatchSampler with total_steps=None is endless and has no length")
        return self.total_steps - self.start_step


def eval_batches(num_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's evaluation batches: a contiguous shard of ``range(num_items)`` cut into batches.

    Shards differ in size by at most one item and the last batch may be short, so over all ranks
    every item appears exactly once (docs/method.md §9: no dropped or duplicated validation images).
    A rank may receive no batch when ``num_items < world_size``; reduce metrics with a sum.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    start = rank * num_items // world_size
    stop = (rank + 1) * num_items // world_size
    return [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
