"""Variable-length sequences: pad in ``collate_fn``, pack for an RNN.

Sequences of random length cannot be stacked by ``default_collate``. A ``pad_collate`` function pads each batch to
its longest sequence with ``pad_sequence(batch_first=True)`` and returns the true lengths alongside, so the model
can ``pack_padded_sequence`` them and the GRU never reads the padding. ``aloader.DataLoader`` takes the
``collate_fn`` exactly as torch's does. Run: ``python examples/variable_length.py``.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

import aloader

VOCAB_SIZE = 50
PAD = 0  # token 0 is reserved for padding; real tokens are 1..VOCAB_SIZE-1


class RandomSequences(aloader.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``n`` integer sequences of length 2..max_len, each with a label: whether its sum is above average."""

    def __init__(self, n: int, max_len: int, generator: torch.Generator) -> None:
        lengths = torch.randint(2, max_len + 1, (n,), generator=generator)
        self.sequences = [torch.randint(1, VOCAB_SIZE, (int(length),), generator=generator) for length in lengths]
        self.labels = [torch.tensor(int(s.float().mean() > VOCAB_SIZE / 2)) for s in self.sequences]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sequences[idx], self.labels[idx]


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(padded sequences [B, T_max], lengths [B], labels [B])."""
    sequences, labels = zip(*batch, strict=True)
    lengths = torch.tensor([len(s) for s in sequences])
    padded_batch = pad_sequence(list(sequences), batch_first=True, padding_value=PAD)
    return padded_batch, lengths, torch.stack(labels)


class GRUClassifier(nn.Module):
    def __init__(self, embedding_dim: int = 16, hidden_size: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, embedding_dim, padding_idx=PAD)
        self.gru = nn.GRU(embedding_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 2)

    def forward(self, padded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.embedding(padded)  # [B, T_max, E]
        # enforce_sorted=False: the batch need not be sorted by length (pack sorts and unsorts internally).
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        packed_out, hidden = self.gru(packed)  # hidden: [1, B, H], each sequence's state at its own last step
        outputs, _ = pad_packed_sequence(packed_out, batch_first=True)  # [B, T_max, H], zeros past each length
        return self.head(hidden[-1]), outputs


def main() -> None:
    torch.manual_seed(0)
    dataset = RandomSequences(n=40, max_len=12, generator=torch.Generator().manual_seed(0))
    loader = aloader.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=pad_collate)
    model = GRUClassifier()

    n_batches = 0
    with torch.no_grad():
        for batch, (padded, lengths, labels) in enumerate(loader):
            logits, outputs = model(padded, lengths)
            print(
                f"batch {batch}: padded {tuple(padded.shape)} lengths {lengths.tolist()} "
                f"gru outputs {tuple(outputs.shape)} logits {tuple(logits.shape)} labels {tuple(labels.shape)}"
            )
            assert padded.shape[1] == int(lengths.max()) == outputs.shape[1]
            assert all(bool((row[n:] == PAD).all()) for row, n in zip(padded, lengths, strict=True))
            n_batches += 1
    print(f"OK variable_length: {n_batches} padded batches of {len(dataset)} sequences")


if __name__ == "__main__":
    main()
