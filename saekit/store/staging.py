"""Host batches to a CUDA device: gathered into pinned memory, copied on a side stream, cast on the device.

The loader gathers each batch's rows in the store's dtype (float16 / bfloat16: half the bytes
of float32 over PCIe) into one of a ring of pinned host buffers; `to_device` copies it with
`non_blocking=True` on a dedicated stream and casts there, so the copy of batch i+1 overlaps
the step on batch i.  The consumer's stream waits for the copy before it uses the tensor
(`wait_stream`, `record_stream`: the caching allocator must not hand the memory back to the
copy stream while the step still reads it), and a ring slot is refilled only once the copy
out of it has finished (its event).  CUDA only, and only with `batches(gather_on_device=False)`:
by default a CUDA stream copies whole fills and gathers on the device (`BatchStream._device_batches`).
"""

from __future__ import annotations

import numpy as np
import torch


class PinnedRing:
    """`slots` pinned host buffers per hook, each (batch, width) in the stored dtype, with the event of its last copy."""

    def __init__(self, shapes: dict[str, tuple[int, int]], np_dtype: np.dtype, slots: int, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.bfloat16 = np.dtype(np_dtype) == np.uint16
        torch_dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.uint16): torch.int16,
                       np.dtype(np.float32): torch.float32}[np.dtype(np_dtype)]
        with torch.cuda.device(device):  # from a producer thread too, whose current device is cuda:0
            self.host = [{h: torch.empty(s, dtype=torch_dtype, pin_memory=True) for h, s in shapes.items()} for _ in range(slots)]
        self.events: list[torch.cuda.Event | None] = [None] * slots

    def __len__(self) -> int:
        return len(self.host)

    def host_arrays(self, slot: int) -> dict[str, np.ndarray]:
        """Slot `slot` as numpy arrays to gather into, once the copy last made from it has finished."""
        ev = self.events[slot]
        if ev is not None:
            ev.synchronize()
        return {h: t.numpy().view(np.uint16) if self.bfloat16 else t.numpy() for h, t in self.host[slot].items()}

    def to_device(self, slot: int, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Copy slot `slot` to the device and cast it to `dtype` (None: the stored dtype) on the copy stream."""
        consumer = torch.cuda.current_stream(self.device)
        out = {}
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for h, t in self.host[slot].items():
                x = t.view(torch.bfloat16) if self.bfloat16 else t
                x = x.to(self.device, non_blocking=True)
                out[h] = x if dtype is None or x.dtype == dtype else x.to(dtype)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[slot] = ev
        consumer.wait_stream(self.stream)
        for x in out.values():
            x.record_stream(consumer)
        return out
