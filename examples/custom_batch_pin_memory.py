"""Memory pinning with a custom batch type, the example from torch's ``torch.utils.data`` docs.

With ``pin_memory=True`` the loader pins each batch in page-locked host memory so that copies to the accelerator
are faster and can be asynchronous (``.to(device, non_blocking=True)``). Tensors and containers of tensors are
pinned automatically; a custom batch type opts in by defining a ``pin_memory()`` method that returns the pinned
batch. ``aloader.DataLoader`` calls it exactly as torch's loader does.
Run: ``python examples/custom_batch_pin_memory.py``.
"""

import torch

import aloader


class SimpleCustomBatch:
    """A batch of ``(input, target)`` pairs, transposed into one stacked tensor each."""

    def __init__(self, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        transposed_data = list(zip(*data, strict=True))
        self.inp = torch.stack(transposed_data[0], 0)
        self.tgt = torch.stack(transposed_data[1], 0)

    # custom memory pinning method on custom type
    def pin_memory(self) -> "SimpleCustomBatch":
        self.inp = self.inp.pin_memory()
        self.tgt = self.tgt.pin_memory()
        return self


def collate_wrapper(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> SimpleCustomBatch:
    return SimpleCustomBatch(batch)


def main() -> None:
    torch.manual_seed(0)
    inps = torch.arange(10 * 5, dtype=torch.float32).view(10, 5)
    tgts = torch.arange(10 * 5, dtype=torch.float32).view(10, 5)
    dataset = aloader.TensorDataset(inps, tgts)

    # Pinning needs an accelerator (CUDA, XPU, ...). On a machine without one, pin_memory=True only warns
    # ("'pin_memory' argument is set as true but no accelerator is found, ...") and is skipped -- exactly as with
    # torch's DataLoader -- so ask for it only when it can take effect, and the example runs warning-free anywhere.
    pin = torch.accelerator.is_available()
    device = torch.accelerator.current_accelerator() if pin else torch.device("cpu")
    print(f"accelerator available: {pin}; pin_memory={pin}; device {device}")

    loader = aloader.DataLoader(dataset, batch_size=2, collate_fn=collate_wrapper, pin_memory=pin)

    for batch_ndx, sample in enumerate(loader):
        assert isinstance(sample, SimpleCustomBatch)
        print(batch_ndx, sample.inp.is_pinned(), sample.tgt.is_pinned(), tuple(sample.inp.shape))
        assert sample.inp.is_pinned() == pin
        assert sample.tgt.is_pinned() == pin
        inp = sample.inp.to(device, non_blocking=True)  # a pinned source makes this copy asynchronous
        assert torch.equal(inp.cpu(), inps[2 * batch_ndx : 2 * batch_ndx + 2])
    print(f"OK custom_batch_pin_memory: {len(loader)} batches, pinned={pin}")


if __name__ == "__main__":
    main()
