"""How the loader's state stays JSON-serialisable: generator states and tensors inside user states as base64 text."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final

import torch

__all__ = ["decode", "decode_rng", "encode", "encode_rng"]


def encode_rng(state: torch.Tensor) -> str:
    """A generator's state (a uint8 tensor) as base64 text. From its buffer: a list of its ~5,000 bytes as Python ints
    took ~0.1 ms, at every ``iter()`` of a loader (the epoch's starting state is recorded for a resume)."""
    return base64.b64encode(state.contiguous().numpy().tobytes()).decode("ascii")


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


TENSOR: Final = "__aloader_tensor__"


def encode(state: Any) -> Any:
    """A user object's state with its tensors (a torch generator's state, say) as base64 text: the loader's state
    stays JSON-serialisable. ``decode`` gives the tensors back before the state is loaded."""
    if isinstance(state, torch.Tensor):
        data = state.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        dtype = str(data.dtype).removeprefix("torch.")
        return {TENSOR: base64.b64encode(raw).decode("ascii"), "dtype": dtype, "shape": list(data.shape)}
    if isinstance(state, Mapping):
        return {key: encode(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(encode(value) for value in state)
    return state


def decode(state: Any) -> Any:
    if isinstance(state, Mapping):
        if TENSOR in state:
            dtype = getattr(torch, state["dtype"])
            raw = bytearray(base64.b64decode(state[TENSOR]))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(state["shape"]).clone()
        return {key: decode(value) for key, value in state.items()}
    if isinstance(state, list):
        return [decode(value) for value in state]
    return state
