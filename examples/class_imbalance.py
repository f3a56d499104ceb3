"""Class imbalance: rebalance an epoch with ``WeightedRandomSampler``.

A dataset with 95% of class 0 and 5% of class 1. Giving each sample the weight 1 / (count of its class) makes both
classes equally likely to be drawn, so an epoch drawn with replacement by ``WeightedRandomSampler`` is roughly
balanced. ``aloader.DataLoader`` takes the sampler exactly as torch's does (``aloader`` re-exports the sampler, so
one import serves). Run: ``python examples/class_imbalance.py``.
"""

from collections import Counter

import torch

import aloader

N_SAMPLES = 2000
MINORITY_FRACTION = 0.05


def make_imbalanced(n: int, generator: torch.Generator) -> aloader.TensorDataset:
    labels = (torch.rand(n, generator=generator) < MINORITY_FRACTION).long()
    features = torch.randn(n, 4, generator=generator) + labels.unsqueeze(1).float()  # class 1 shifted by +1
    return aloader.TensorDataset(features, labels)


def class_counts(loader: aloader.DataLoader) -> Counter[int]:
    counts: Counter[int] = Counter()
    for _, labels in loader:
        counts.update(labels.tolist())
    return counts


def main() -> None:
    torch.manual_seed(0)
    dataset = make_imbalanced(N_SAMPLES, torch.Generator().manual_seed(0))
    labels = dataset.tensors[1]

    class_count = torch.bincount(labels)  # samples per class
    sample_weights = 1.0 / class_count[labels].double()  # one weight per sample: 1 / its class's count
    print(f"dataset: {N_SAMPLES} samples, class counts {class_count.tolist()}")
    print(f"per-sample weight: class 0 -> {1 / class_count[0]:.6f}, class 1 -> {1 / class_count[1]:.6f}")

    plain = aloader.DataLoader(dataset, batch_size=100, shuffle=True)
    sampler = aloader.WeightedRandomSampler(sample_weights, num_samples=N_SAMPLES, replacement=True)
    balanced = aloader.DataLoader(dataset, batch_size=100, sampler=sampler)

    without = class_counts(plain)
    with_sampler = class_counts(balanced)
    print(f"one epoch without sampler: class 0: {without[0]:5d}  class 1: {without[1]:5d}")
    print(f"one epoch with sampler:    class 0: {with_sampler[0]:5d}  class 1: {with_sampler[1]:5d}")

    minority_share = with_sampler[1] / N_SAMPLES
    assert without[1] == class_count[1], "a plain epoch sees every sample exactly once"
    assert 0.4 < minority_share < 0.6, minority_share
    print(f"OK class_imbalance: minority share {without[1] / N_SAMPLES:.3f} -> {minority_share:.3f} with the sampler")


if __name__ == "__main__":
    main()
