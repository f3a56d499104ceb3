"""Logistic regression on a CSV file, read by a ``Dataset`` built on the ``csv`` module.

The classic "load a CSV, train a linear model" tutorial, with ``aloader.DataLoader`` in place of torch's. The data
is generated with a known linear rule plus noise (label = 1 when 2*x1 - 3*x2 + 0.5 + noise > 0), written to a CSV
in a temporary directory, then read back row by row by the dataset. Run: ``python examples/tabular_csv.py``.
"""

import csv
import tempfile
from pathlib import Path

import torch
from torch import nn

import aloader

N_ROWS = 512
EPOCHS = 3
BATCH_SIZE = 64


def write_csv(path: Path, n_rows: int, generator: torch.Generator) -> None:
    """Two numeric features and a binary label from a known linear rule plus noise."""
    features = torch.randn(n_rows, 2, generator=generator)
    noise = 0.3 * torch.randn(n_rows, generator=generator)
    labels = (2 * features[:, 0] - 3 * features[:, 1] + 0.5 + noise > 0).int()
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x1", "x2", "label"])
        for (x1, x2), y in zip(features.tolist(), labels.tolist(), strict=True):
            writer.writerow([f"{x1:.6f}", f"{x2:.6f}", y])


class CsvDataset(aloader.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One row per sample: a float feature vector and a float label (0.0 or 1.0)."""

    def __init__(self, path: Path) -> None:
        with path.open(newline="") as f:
            self.rows = list(csv.DictReader(f))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[idx]
        x = torch.tensor([float(row["x1"]), float(row["x2"])])
        y = torch.tensor(float(row["label"]))
        return x, y


def accuracy(model: nn.Module, loader: aloader.DataLoader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            predicted = (model(x).squeeze(1) > 0).float()  # logit > 0 <=> sigmoid > 0.5
            correct += int((predicted == y).sum())
            total += len(y)
    return correct / total


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        write_csv(path, N_ROWS, torch.Generator().manual_seed(0))
        dataset = CsvDataset(path)
        print(f"wrote {len(dataset)} rows to {path.name}")

        loader = aloader.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
        model = nn.Linear(2, 1)  # logistic regression: a linear layer whose output is a logit
        loss_fn = nn.BCEWithLogitsLoss()  # sigmoid + binary cross-entropy, numerically stable
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

        for epoch in range(EPOCHS):
            for batch, (x, y) in enumerate(loader):
                loss = loss_fn(model(x).squeeze(1), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                print(f"epoch {epoch} batch {batch} loss {loss.item():.4f}")

        acc = accuracy(model, aloader.DataLoader(dataset, batch_size=BATCH_SIZE))
        weight, bias = model.weight.detach().squeeze().tolist(), model.bias.item()
        print(f"learned weights {weight[0]:.2f}, {weight[1]:.2f} bias {bias:.2f} (rule: 2, -3, 0.5, up to scale)")
        print(f"accuracy {acc:.3f}")
        assert acc > 0.8, acc
    print(f"OK tabular_csv: accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
