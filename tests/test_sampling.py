"""How training samples are split and ordered across processes, epochs and resumes
(:mod:`fmpsr.data.sampling`), without starting any process: each rank's sampler is built with its
rank number and batched as BasicSR's DataLoader batches it (``batch_size_per_gpu``, drop_last).

What holds (and what the README says): N ranks with batch b see, at every step, exactly the samples
one process with batch N*b sees at that step (rank r gets positions r, r+N, r+2N, ... of the single
process's batch), with the same augmentation, provided N divides the enlarged epoch
(``len(dataset) * dataset_enlarge_ratio``); otherwise BasicSR pads the epoch to a multiple of N and the
permutation differs. Weights are not bit-identical (float sums in another order), see
tests/test_reliability.py::test_two_gloo_ranks_agree_and_match_one_process.
"""
import random

import numpy as np
import pytest
import torch

from fmpsr.data.sampling import ResumableSampler, SampleKey, SeededDataset


class Items(torch.utils.data.Dataset):
    """n items; item i is (i, a draw from ``random``, a draw from ``numpy.random``): the draws stand for
    BasicSR's random crop / flip / rotation."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index, random.random(), float(np.random.rand())


def batches(dataset_len, ratio, num_replicas, rank, batch, epoch=0, resume=None, seed=0):
    """The batches (lists of (epoch, enlarged index, item, draws)) one rank's DataLoader yields in an epoch."""
    dataset = SeededDataset(Items(dataset_len), seed)
    sampler = ResumableSampler(dataset, num_replicas, rank, ratio)
    if resume is not None:
        sampler.resume_from(*resume)
    sampler.set_epoch(epoch)
    keys = list(iter(sampler))
    out = []
    for start in range(0, len(keys) - batch + 1, batch):  # drop_last, as BasicSR's training loader
        out.append([(k.epoch, k.index, *dataset[k]) for k in keys[start:start + batch]])
    return out


@pytest.mark.parametrize('n, ratio, ranks, batch', [(4, 50, 2, 1), (4, 50, 2, 2), (6, 4, 3, 2), (10, 3, 2, 3)])
@pytest.mark.parametrize('epoch', [0, 3])
def test_n_ranks_with_batch_b_see_the_batches_of_one_process_with_batch_n_times_b(n, ratio, ranks, batch, epoch):
    assert (n * ratio) % ranks == 0
    single = batches(n, ratio, 1, 0, ranks * batch, epoch)
    per_rank = [batches(n, ratio, ranks, r, batch, epoch) for r in range(ranks)]
    assert all(len(b) == len(single) for b in per_rank)  # the same number of steps per epoch
    for step, big in enumerate(single):
        # rank r's j-th sample is the single process's sample j*N + r: same items, same augmentation
        interleaved = [per_rank[r][step][j] for j in range(batch) for r in range(ranks)]
        assert interleaved == big
    # and every sample of the epoch is seen once (the enlarged epoch is a permutation)
    seen = sorted(s[1] for b in single for s in b)
    assert seen == list(range(len(seen))) and len(seen) == (n * ratio) // (ranks * batch) * (ranks * batch)


def test_ranks_see_disjoint_samples_and_epochs_reshuffle():
    rank0, rank1 = batches(4, 50, 2, 0, 2), batches(4, 50, 2, 1, 2)
    indices0 = {s[1] for b in rank0 for s in b}
    indices1 = {s[1] for b in rank1 for s in b}
    assert not indices0 & indices1 and len(indices0 | indices1) == 200
    assert batches(4, 50, 1, 0, 4, epoch=0) != batches(4, 50, 1, 0, 4, epoch=1)


def test_when_n_does_not_divide_the_epoch_the_order_differs():
    """BasicSR pads the epoch to a multiple of the number of ranks (EnlargedSampler.total_size): the
    permutation is then of another length, and the two runs see other samples (documented, not hidden)."""
    single = batches(5, 3, 1, 0, 2)          # 15 samples
    per_rank = [batches(5, 3, 2, r, 1) for r in range(2)]  # padded to 16
    interleaved = [[per_rank[r][step][0] for r in range(2)] for step in range(len(single))]
    assert interleaved != single


@pytest.mark.parametrize('ranks, batch', [(1, 4), (2, 2)])
def test_a_resumed_epoch_continues_with_the_batches_an_uninterrupted_run_would_see(ranks, batch):
    """``resume_from(epoch, consumed)`` leaves out exactly the first ``consumed`` samples of each rank."""
    consumed_steps = 7
    for r in range(ranks):
        full = batches(4, 50, ranks, r, batch, epoch=2)
        resumed = batches(4, 50, ranks, r, batch, epoch=2, resume=(2, consumed_steps * batch))
        assert resumed == full[consumed_steps:]
        # another epoch is not skipped
        assert batches(4, 50, ranks, r, batch, epoch=3, resume=(2, consumed_steps * batch)) == \
            batches(4, 50, ranks, r, batch, epoch=3)


def test_augmentation_depends_on_the_sample_alone():
    """The same SampleKey gives the same draws in any process, worker or call order."""
    a, b = SeededDataset(Items(4), seed=5), SeededDataset(Items(4), seed=5)
    keys = [SampleKey(1, v) for v in (3, 7, 0, 3)]
    random.seed(123)  # whatever state the process is in
    forward = [a[k] for k in keys]
    np.random.seed(9)
    backward = [b[k] for k in reversed(keys)][::-1]
    assert forward == backward and forward[0] == forward[3]
    assert a[SampleKey(1, 3)] != a[SampleKey(2, 3)]          # another epoch, another augmentation
    assert a[SampleKey(1, 3)] != SeededDataset(Items(4), seed=6)[SampleKey(1, 3)]  # another manual_seed
    assert a[SampleKey(1, 3)][0] == a[SampleKey(1, 7)][0] == 3  # enlarged index 7 is item 7 % 4
