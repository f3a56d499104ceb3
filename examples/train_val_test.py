"""Train / validation / test split with checkpointing of the best model.

A synthetic regression dataset (y = x . w + b + noise) is split 70/15/15 with ``random_split`` and a seeded
generator, so the split is the same on every run. Each epoch trains on the train split and evaluates on the
validation split; whenever the validation loss improves, a checkpoint (model ``state_dict``, epoch, validation
loss) is saved with ``torch.save``. At the end the best checkpoint is loaded and evaluated once on the test split.
Only the loader class differs from torch's tutorial code. Run: ``python examples/train_val_test.py``.
"""

import tempfile
from pathlib import Path

import torch
from torch import nn

import aloader

N_SAMPLES = 1000
N_FEATURES = 8
EPOCHS = 8


def make_regression(n: int, generator: torch.Generator) -> aloader.TensorDataset:
    x = torch.randn(n, N_FEATURES, generator=generator)
    true_w = torch.randn(N_FEATURES, generator=generator)
    y = x @ true_w + 0.3 + 0.1 * torch.randn(n, generator=generator)
    return aloader.TensorDataset(x, y.unsqueeze(1))


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, 1))


def train_one_epoch(
    model: nn.Module, loader: aloader.DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer
) -> float:
    model.train()
    total, count = 0.0, 0
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(x), count + len(x)
    return total / count


def evaluate(model: nn.Module, loader: aloader.DataLoader, loss_fn: nn.Module) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total, count = total + loss_fn(model(x), y).item() * len(x), count + len(x)
    return total / count


def main() -> None:
    torch.manual_seed(0)
    dataset = make_regression(N_SAMPLES, torch.Generator().manual_seed(0))
    train_set, val_set, test_set = aloader.random_split(
        dataset, [0.7, 0.15, 0.15], generator=torch.Generator().manual_seed(42)
    )
    print(f"split {len(dataset)} samples into train {len(train_set)}, val {len(val_set)}, test {len(test_set)}")

    # An unchanged TensorDataset (here inside random_split's Subsets) has each batch gathered in one op per tensor,
    # not sample by sample: the same batches as torch's DataLoader makes.
    ours = aloader.DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    theirs = torch.utils.data.DataLoader(
        train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    for mine, torchs in zip(ours, theirs, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine, torchs, strict=True))
    print("batches equal torch's DataLoader's")

    train_loader = aloader.DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader = aloader.DataLoader(val_set, batch_size=64)
    test_loader = aloader.DataLoader(test_set, batch_size=64)

    model = make_model()
    loss_fn = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_path = Path(tmp) / "best.pt"
        best_val = float("inf")
        for epoch in range(EPOCHS):
            train_loss = train_one_epoch(model, train_loader, loss_fn, optimizer)
            val_loss = evaluate(model, val_loader, loss_fn)
            improved = val_loss < best_val
            if improved:
                best_val = val_loss
                torch.save({"epoch": epoch, "model": model.state_dict(), "val_loss": val_loss}, checkpoint_path)
            note = "  -> saved checkpoint" if improved else ""
            print(f"epoch {epoch}: train loss {train_loss:.4f}  val loss {val_loss:.4f}{note}")

        checkpoint = torch.load(checkpoint_path, weights_only=True)
        best_model = make_model()
        best_model.load_state_dict(checkpoint["model"])
        print(f"loaded best checkpoint: epoch {checkpoint['epoch']}, val loss {checkpoint['val_loss']:.4f}")

    test_loss = evaluate(best_model, test_loader, loss_fn)
    baseline = evaluate(make_model(), test_loader, loss_fn)
    print(f"test loss {test_loss:.4f} (untrained model: {baseline:.4f})")
    assert test_loss < baseline / 5, (test_loss, baseline)
    print(f"OK train_val_test: best epoch {checkpoint['epoch']}, test loss {test_loss:.4f}")


if __name__ == "__main__":
    main()
