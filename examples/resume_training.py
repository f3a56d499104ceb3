"""Checkpoint the loader with the model, get killed mid-epoch, resume exactly (docs/resume.md).

The script trains a small model for 3 epochs three ways and checks they agree:

1. uninterrupted, in this process;
2. in a child process that saves a checkpoint (model, optimizer, torch's RNG and ``loader.state_dict()``) after
   every step and is killed with SIGKILL in the middle of epoch 1, as a preempted job would be;
3. resumed here from the child's last checkpoint by a *new* loader (with another ``concurrency``), which yields
   the rest of epoch 1 and then epoch 2 as the uninterrupted run did.

The samples seen per epoch and the final weights must be identical. Ends by printing OK.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import aloader

EPOCHS, STEPS_PER_EPOCH, BATCH = 3, 8, 8
KILL_AT = (1, 3)  # epoch 1, after its 3rd step


def make_loader(concurrency: int = 8) -> aloader.DataLoader[Any]:
    torch.manual_seed(0)
    x = torch.randn(STEPS_PER_EPOCH * BATCH, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(len(x))
    ids = torch.arange(len(x))
    dataset = aloader.TensorDataset(ids, x, y)
    generator = torch.Generator().manual_seed(1234)  # a seeded generator: the shuffles are part of the state
    return aloader.DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=generator, concurrency=concurrency)


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def train(
    loader: aloader.DataLoader[Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    start_epoch: int,
    seen: dict[int, list[int]],
    checkpoint: Path | None = None,
    kill_at: tuple[int, int] | None = None,
) -> None:
    for epoch in range(start_epoch, EPOCHS):
        # After a resume, the first epoch continues mid-way: count steps from what it already yielded.
        step = loader.state_dict()["batches"]
        for ids, x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen.setdefault(epoch, []).extend(ids.tolist())
            step += 1
            if checkpoint is not None:
                state = {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "loader": json.dumps(loader.state_dict()),  # small, JSON, no sample data
                    "seen": seen,
                }
                torch.save(state, checkpoint.with_suffix(".tmp"))
                os.replace(checkpoint.with_suffix(".tmp"), checkpoint)  # a kill never leaves half a file
            if kill_at == (epoch, step):
                os.kill(os.getpid(), signal.SIGKILL)  # preempted: no cleanup, no goodbye


def child(checkpoint: Path) -> None:
    model, optimizer = make_model()
    train(make_loader(), model, optimizer, 0, {}, checkpoint, kill_at=KILL_AT)


def main() -> None:
    torch.set_num_threads(1)
    # 1. Uninterrupted.
    model, optimizer = make_model()
    expected: dict[int, list[int]] = {}
    train(make_loader(), model, optimizer, 0, expected)
    expected_weights = [p.detach().clone() for p in model.parameters()]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt.pt"
        # 2. A child process trains with checkpoints and is killed mid-epoch.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, __file__, "--child", str(checkpoint)], env=env, check=False)
        assert run.returncode == -signal.SIGKILL, run.returncode

        # 3. Resume from its last checkpoint in fresh objects.
        saved = torch.load(checkpoint, weights_only=False)
    model, optimizer = make_model()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    loader = make_loader(concurrency=3)  # the state does not depend on concurrency (nor on num_workers)
    loader_state = json.loads(saved["loader"])
    loader.load_state_dict(loader_state)
    print(f"resuming epoch {loader_state['epoch']} after {loader_state['batches']} of {len(loader)} batches")
    seen: dict[int, list[int]] = {int(k): v for k, v in saved["seen"].items()}
    train(loader, model, optimizer, saved["epoch"], seen)

    assert seen == expected, "the resumed run saw other samples"
    for epoch in range(EPOCHS):
        assert sorted(seen[epoch]) == list(range(STEPS_PER_EPOCH * BATCH))  # each sample once per epoch
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected_weights, strict=True))
    print("OK")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(Path(sys.argv[2]))
    else:
        main()
