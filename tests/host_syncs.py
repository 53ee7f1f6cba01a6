"""Count the calls that make a GPU's host wait for its queue (host-device synchronisations), on the CPU.

On a CPU nothing waits, so the calls are counted by name: while a `HostSyncs` is active, the tensor methods and torch
functions below are replaced by wrappers that record each call that needs a device value on the host, then call the
original. They are patched on `torch.Tensor` and `torch`, not through a TorchFunctionMode, because a mode is
thread-local state that the autograd engine does not carry into backward, where activation checkpointing recomputes
the forward.

    reads          item, tolist, numpy, cpu, to(cpu), bool / int / float / index of a tensor
    data-dependent nonzero, argwhere, bincount (CUDA's reads its input's range), unique, unique_consecutive,
                   masked_select, boolean-mask indexing, one-argument where, repeat_interleave without output_size

Kernels that autograd's C++ engine calls are not seen; none of the formulas our code reaches synchronises.

    with HostSyncs() as syncs:
        loss.backward()
    assert syncs.count == 0, syncs.calls
"""

from __future__ import annotations

import functools
import traceback

import torch

_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
_DATA_DEPENDENT = ("nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select")
_CONDITIONAL = ("repeat_interleave", "where", "__getitem__", "to")


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _READS or name in _DATA_DEPENDENT:
        return True
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "__getitem__":
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if name == "to":
        targets = [*args[1:], kwargs.get("device")]
        return any(str(t) == "cpu" for t in targets if isinstance(t, str | torch.device))
    return False


class HostSyncs:
    """Context manager: counts the host-device synchronisations called from Python; `calls` says where each was."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._originals: list[tuple[object, str, object, bool]] = []  # (owner, name, original, owned by owner)

    @property
    def count(self) -> int:
        """Synchronisations seen so far."""
        return len(self.calls)

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if _is_sync(name, args, kwargs):
                caller = traceback.extract_stack(limit=2)[0]  # the frame that called the function
                self.calls.append(f"{name} at {caller.filename}:{caller.lineno}")
            return original(*args, **kwargs)

        return counted

    def __enter__(self) -> HostSyncs:
        for name in (*_READS, *_DATA_DEPENDENT, *_CONDITIONAL):
            for owner in (torch.Tensor, torch):
                original = getattr(owner, name, None)  # a Tensor method may be inherited from the C base class
                if original is not None:
                    self._originals.append((owner, name, original, name in vars(owner)))
                    setattr(owner, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original, owned in reversed(self._originals):
            if owned:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # inherited again
        self._originals.clear()
