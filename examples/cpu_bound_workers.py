"""CPU-heavy preprocessing in worker processes: a tokeniser written in pure Python, with a random augmentation.

Tokenising and augmenting text in pure Python holds the GIL, so threads cannot spread it over the cores. With
``num_workers=2`` an unchanged torch ``Dataset`` is fetched in two worker processes, the per-sample ``transform`` runs
there too, and batches come back through shared memory. The workers are seeded as torch seeds them, so the batches,
including the random augmentation drawn inside ``__getitem__``, equal those of torch's DataLoader with the same seed
(with ``concurrency=1``: one sample at a time per worker, as torch's).
``persistent_workers=True`` keeps the processes across epochs; ``loader.close()`` (here: the ``with`` block) ends them.

Classes used in workers live at module level and the work is under ``if __name__ == "__main__":``, so that the
script also works where workers are not forked (the forkserver or spawn import this file in each worker).
Run: ``python examples/cpu_bound_workers.py``.
"""

import os
import random

import torch

import aloader

VOCAB_SIZE = 1000
SEQ_LEN = 32
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "far", "away"]


def tokenise(text: str) -> list[int]:
    """A deliberately slow hashing tokeniser: pure Python work per character."""
    ids = []
    for word in text.split():
        h = 0
        for ch in word:
            h = (h * 131 + ord(ch)) % 1_000_003
        ids.append(h % VOCAB_SIZE)
    return ids


class SentenceDataset(aloader.Dataset[dict[str, torch.Tensor]]):
    """Sentences made up on the fly, tokenised, with random word dropout (drawn from ``random``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(40)]
        kept = [w for w in words if random.random() > 0.1]  # augmentation: drop ~10% of the words
        ids = tokenise(" ".join(kept))[:SEQ_LEN]
        ids += [0] * (SEQ_LEN - len(ids))
        return {"ids": torch.tensor(ids), "label": torch.tensor(i % 2)}


def with_pid(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-sample transform: runs in a worker process too (records which one)."""
    return {**sample, "pid": torch.tensor(os.getpid())}


def main() -> None:
    torch.manual_seed(0)
    expected = list(torch.utils.data.DataLoader(SentenceDataset(96), batch_size=16, shuffle=True, num_workers=2))

    torch.manual_seed(0)
    # concurrency=1: each worker fetches one sample at a time, as torch's, so the random draws inside __getitem__ are
    # torch's bit for bit. (With more, a worker fetches several samples at once in its threads when it has CPU to
    # spare, and which sample gets which draw follows the threads.)
    with aloader.DataLoader(
        SentenceDataset(96),
        batch_size=16,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        transform=with_pid,
        concurrency=1,
    ) as loader:
        first = list(loader)
        second = list(loader)  # same worker processes, new order

    assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(first, expected, strict=True))
    pids = {int(pid) for batch in first + second for pid in batch["pid"]}
    assert os.getpid() not in pids, pids
    assert len(pids) == 2, pids
    print(f"{len(first)} batches per epoch, equal to torch's; transform ran in worker processes {sorted(pids)}")
    print("OK: CPU-bound preprocessing in 2 worker processes")


if __name__ == "__main__":
    main()
