"""Training data that a resumed or distributed run sees exactly as an uninterrupted single run does.

BasicSR's ``EnlargedSampler`` shuffles by epoch, but a resumed run restarts its epoch from the
beginning, and augmentations (random crop, flips, rotations) draw from each process's global
``random`` state, which a resumed run, another rank or a data-loader worker does not share.

* :class:`ResumableSampler` is ``EnlargedSampler`` with the same order, that yields
  :class:`SampleKey` (epoch, enlarged index) and can skip the samples a killed run already consumed
  in its last epoch.
* :class:`SeededDataset` wraps the training dataset: for a ``SampleKey`` it seeds ``random`` and
  ``numpy.random`` from (manual_seed, epoch, index) before loading, so every sample's augmentation
  is a function of the sample alone, whichever process or worker loads it; and it names the files
  of a pair that fails to load.
"""
import random
from typing import NamedTuple

import numpy as np
import torch

from basicsr.data.data_sampler import EnlargedSampler


class DataLoadError(RuntimeError):
    """A training pair that fails to load; the message names its GT and LQ files (or LMDB keys)."""


class SampleKey(NamedTuple):
    """What :class:`ResumableSampler` yields: the epoch and the index in the enlarged epoch."""
    epoch: int
    index: int


class ResumableSampler(EnlargedSampler):
    """``EnlargedSampler`` (same permutation per epoch) yielding :class:`SampleKey` and able to skip.

    Call :meth:`resume_from` on resume. Every ``__iter__`` of that epoch leaves out the consumed
    samples (BasicSR's prefetcher makes, and discards, one iterator before its loop starts), until
    ``set_epoch`` moves to another epoch.
    """

    def __init__(self, dataset, num_replicas, rank, ratio=1):
        super().__init__(dataset, num_replicas, rank, ratio)
        self.resume = None

    def resume_from(self, epoch, consumed):
        """Leave out the first ``consumed`` samples (of this rank) of epoch ``epoch``."""
        self.resume = (int(epoch), int(consumed))

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        if self.resume is not None and self.resume[0] != epoch:
            self.resume = None

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.epoch)
        indices = torch.randperm(self.total_size, generator=g).tolist()
        indices = indices[self.rank:self.total_size:self.num_replicas]
        skip = self.resume[1] if self.resume is not None and self.resume[0] == self.epoch else 0
        return iter([SampleKey(self.epoch, v) for v in indices[skip:]])


class SeededDataset(torch.utils.data.Dataset):
    """Wrap a BasicSR dataset so each sample's augmentation depends only on (seed, epoch, index).

    Args:
        dataset (Dataset): the wrapped dataset (``opt`` and ``paths`` are looked through).
        seed (int): the option file's ``manual_seed``.

    ``dataset[SampleKey(epoch, v)]`` loads item ``v % len(dataset)``; a plain int is passed through.

    Raises:
        DataLoadError (a RuntimeError): an item fails to load; the message names the GT and LQ files
            (or LMDB keys).
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, int(seed or 0)

    def __getattr__(self, name):
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, SampleKey):
            seed = hash_seed(self.seed, key.epoch, key.index)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            index = key.index % len(self.dataset)
        else:
            index = key
        try:
            return self.dataset[index]
        except Exception as error:  # name the files, keep the original error as the cause
            raise DataLoadError(f'cannot load training pair {index}: {describe_item(self.dataset, index)} '
                               f'({type(error).__name__}: {error}); the file may be unreadable or truncated') from error


def hash_seed(*values):
    """A 63-bit seed from integers, the same in every process (unlike ``hash`` of a str)."""
    seed = 0x9E3779B97F4A7C15
    for v in values:
        seed = (seed * 6364136223846793005 + int(v) + 1442695040888963407) % 2**63
    return seed


def describe_item(dataset, index):
    """'gt: <path>, lq: <path>' for a BasicSR paired dataset item, as far as it can be told."""
    paths = getattr(dataset, 'paths', None)
    if paths is None or index >= len(paths):
        return f'item {index}'
    item = paths[index]
    if isinstance(item, dict):
        return ', '.join(f'{k.replace("_path", "")}: {v}' for k, v in item.items())
    return str(item)
