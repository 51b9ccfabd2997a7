"""The per-bucket table both GPU backends hand their kernels: a CPU int64 [rows, TABLE_COLS]
table (``base.TableCol`` columns, one row per tensor) and, on CUDA, its device copy.

Host writes go through ctypes (no torch op): the whole rows when a bucket's table is built, the
grad column when the gradients moved (or the driver's native reader, ``host_ext``, writes that
column in place through the backend's ``grad_sink``).  ``upload`` copies the host table into a
pinned staging buffer that is reused only once the CUDA event recorded after its last copy has
completed (queried, never waited on), then makes one non-blocking copy to the device; on the CPU
(the Triton interpreter, the CUDA backend's host-side tests) the kernels read the host table
itself and ``upload`` does nothing.
"""
from __future__ import annotations

import ctypes
from typing import List, Sequence, Tuple, Union, cast

import torch
from torch import Tensor

from .base import TABLE_COLS

# What mypy's ctypes plugin wants for a slice assignment into a c_int64 array (a list is invariant,
# so a List[int] does not match although ctypes takes plain ints).
_CInt64List = List[Union[ctypes.c_int64, int]]


class HostTable:
    """A CPU int64 [rows, TABLE_COLS] table and, on CUDA, its device copy (module docstring)."""

    def __init__(self, rows: List[List[int]], device: torch.device):
        self.rows = max(1, len(rows))
        self.host = torch.zeros((self.rows, TABLE_COLS), dtype=torch.int64)
        self.view = (ctypes.c_int64 * (self.rows * TABLE_COLS)).from_address(self.host.data_ptr())
        for i, row in enumerate(rows):
            self.view[i * TABLE_COLS:(i + 1) * TABLE_COLS] = cast(_CInt64List, row)
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._staging: List[Tuple[Tensor, torch.cuda.Event]] = []
        if self.on_cuda:
            self.table = torch.empty((self.rows, TABLE_COLS), dtype=torch.int64, device=device)
            self.upload()
        else:
            self.table = self.host      # the kernels (interpreter) read the host table itself

    def set_column(self, col: int, values: Sequence[int]) -> None:
        self.view[col:len(values) * TABLE_COLS:TABLE_COLS] = cast(_CInt64List, values)

    def column(self, col: int, n: int) -> List[int]:
        return list(self.view[col:n * TABLE_COLS:TABLE_COLS])

    def upload(self) -> None:
        if not self.on_cuda:
            return
        buf = None
        for i, (_, event) in enumerate(self._staging):
            if event.query():
                buf = self._staging.pop(i)[0]
                break
        if buf is None:
            buf = torch.empty_like(self.host, pin_memory=True)
        nbytes = self.rows * TABLE_COLS * 8
        ctypes.memmove(buf.data_ptr(), self.host.data_ptr(), nbytes)
        self.table.copy_(buf, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._staging.append((buf, event))
