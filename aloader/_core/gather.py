"""A batch of an unchanged torch ``TensorDataset`` made as one ``index_select`` per tensor: torch's batch, in one op.

torch's loop makes a batch of a ``TensorDataset`` by indexing every tensor once per sample (``__getitem__``) and
stacking the rows again (``default_collate``): for a batch of 64 ``(x, y)`` pairs, 128 indexing ops and two
stacks, each a trip through torch's dispatcher that also gives up and takes back the GIL (with another Python
thread in the process, each such turn can cost a switch interval). ``index_select`` on each tensor with the batch's
indices makes the same batch: a list with one tensor per dataset tensor, the same values, dtype and shape, a new
contiguous tensor (in a worker process, allocated in shared memory, as torch's collate allocates it there).

It is taken only where nothing could tell the difference: the dataset is exactly ``TensorDataset`` (a subclass may
override ``__getitem__``); ``collate_fn`` is torch's ``default_collate`` with torch's own functions registered for
tensors and no registered type matching a tuple; no ``transform``; every tensor a plain, dense, contiguous CPU tensor
that does not require grad (so no autograd graph to tell apart); and every index a plain ``int`` within range. Any
other batch, or one whose ``index_select`` raises (a negative or out-of-range index), is fetched the usual way,
sample by sample, which gives what torch gives: the batch, or the error that names the sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset, get_worker_info
from torch.utils.data._utils import collate as _torch_collate

from aloader._core.default_collate import plain_tuples

__all__ = ["gather", "gathers"]


_GETITEM = TensorDataset.__getitem__  # torch's own, as imported (a program may patch the class)


def gathers(dataset: Any) -> TensorDataset | None:
    """The dataset if its batches may be gathered (exactly torch's ``TensorDataset``, its own ``__getitem__``)."""
    if type(dataset) is TensorDataset and TensorDataset.__getitem__ is _GETITEM:
        return dataset
    return None


def gather(dataset: TensorDataset, keys: list[Any]) -> list[torch.Tensor] | None:
    """``default_collate([dataset[k] for k in keys])`` in one ``index_select`` per tensor, or None where it may
    differ from it (the caller then makes the batch sample by sample)."""
    fn_map: dict[Any, Any] = _torch_collate.default_collate_fn_map
    if fn_map.get(torch.Tensor) is not _torch_collate.collate_tensor_fn or not plain_tuples(fn_map):
        return None
    if not keys or not all(type(key) is int for key in keys):
        return None
    tensors = dataset.tensors
    for tensor in tensors:
        if not (
            type(tensor) is torch.Tensor
            and tensor.layout is torch.strided
            and tensor.device.type == "cpu"
            and not tensor.requires_grad
            and tensor.is_contiguous()
            and not tensor.is_quantized
            and not tensor.is_conj()
            and not tensor.is_neg()
        ):
            return None
    index = torch.tensor(keys, dtype=torch.long)
    shared = get_worker_info() is not None
    batch = []
    try:
        for tensor in tensors:
            if shared:  # as torch's collate_tensor_fn allocates a worker's batch
                shape = (len(keys), *tensor.shape[1:])
                storage: Any = tensor._typed_storage()._new_shared(  # type: ignore[no-untyped-call]
                    len(keys) * tensor[0].numel(), device=tensor.device
                )
                out = tensor.new(storage).resize_(shape)
                batch.append(torch.index_select(tensor, 0, index, out=out))
            else:
                batch.append(torch.index_select(tensor, 0, index))
    except (IndexError, RuntimeError):
        return None  # an index out of range (or negative): the usual way raises what torch raises
    return batch
