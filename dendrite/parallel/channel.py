"""How rank 0 hands each step's `StepPlan` to the other ranks.

The native KV tree, the scheduler and the sampler live in rank 0 only; the
other ranks run whatever plan rank 0 ran, in the same order. A plan is packed
into one byte string (`pack_plan`: a 9-int64 header with the array lengths,
then the arrays' raw bytes, in the plan's own dtypes) and written to a TCP
socket per follower (`PlanChannel`). Page ids are the same on every rank, so
the plan needs no translation: rank r just reads its own KV heads of those
pages.

Why sockets and not a `torch.distributed` broadcast: a follower may wait
for the next step for as long as the engine is idle, which a collective's
timeout does not allow; a closed socket is also how each side learns that
the other is gone (EOF), at once. Packing beats pickling the dataclass
(benchmarks/bench_parallel.py `--sections plan` measures both, and
`broadcast_object_list` over gloo).

A step launched ahead (lookahead) carries its token ids on the device; its
header says so and the ids follow as a `torch.distributed.broadcast` from
rank 0 (on the device, no host sync).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dendrite.model.step import StepPlan

__all__ = ["STOP", "PlanChannel", "pack_plan", "unpack_plan"]

#: Message that ends a follower's loop (closing the engine).
STOP = b"stop"

_LEN = struct.Struct("<Q")
_STEP, _FIELDS = 1, 9
# (field, dtype, length key) in payload order; the lengths are header entries.
_LAYOUT = (
    ("positions", np.int64, "T"),
    ("slot_mapping", np.int64, "T"),
    ("qo_indptr", np.int32, "B1"),
    ("kv_indptr", np.int32, "B1"),
    ("kv_indices", np.int32, "nnz"),
    ("kv_last_page_len", np.int32, "B"),
    ("copies", np.int32, "m3"),
    ("sample_rows", np.int64, "N"),
    ("score_rows", np.int64, "M"),
)


def pack_plan(plan: StepPlan) -> bytes:
    """The plan as bytes; token ids on the device are not included (flagged)."""
    fed = isinstance(plan.input_ids, torch.Tensor)
    t, b = len(plan.positions), plan.num_rows
    copies = np.asarray(plan.copies, dtype=np.int32).reshape(-1)
    header = np.array([_STEP, t, b, len(plan.kv_indices), len(copies) // 3,
                       len(plan.sample_rows), len(plan.score_rows), int(fed), 0],
                      dtype=np.int64)
    parts = [header.tobytes()]
    if not fed:
        parts.append(np.asarray(plan.input_ids, dtype=np.int32).tobytes())
    for name, dtype, _ in _LAYOUT:
        arr = copies if name == "copies" else getattr(plan, name)
        parts.append(np.asarray(arr, dtype=dtype).tobytes())
    return b"".join(parts)


def unpack_plan(buf: bytes | bytearray) -> tuple[StepPlan, bool]:
    """(plan, fed): with `fed`, `plan.input_ids` is a placeholder to be replaced
    by the ids rank 0 broadcasts."""
    header = np.frombuffer(buf, dtype=np.int64, count=_FIELDS)
    _, t, b, nnz, m, n, mm, fed, _ = (int(x) for x in header)
    lengths = {"T": t, "B1": b + 1, "nnz": nnz, "B": b, "m3": 3 * m, "N": n, "M": mm}
    off = header.nbytes
    fields = {}
    if not fed:
        fields["input_ids"] = np.frombuffer(buf, dtype=np.int32, count=t, offset=off)
        off += 4 * t
    else:
        fields["input_ids"] = np.zeros(t, dtype=np.int32)
    for name, dtype, key in _LAYOUT:
        k = lengths[key]
        fields[name] = np.frombuffer(buf, dtype=dtype, count=k, offset=off)
        off += k * np.dtype(dtype).itemsize
    fields["copies"] = fields["copies"].reshape(-1, 3)
    return StepPlan(**fields), bool(fed)


@dataclass
class PlanChannel:
    """Rank 0's sockets to the followers, or a follower's socket to rank 0."""

    socks: list[socket.socket]
    rank: int

    @classmethod
    def serve(cls, store: dist.Store, world_size: int, host: str = "127.0.0.1",
              key: str = "dendrite/plan_channel",
              check: Callable[[], None] | None = None) -> PlanChannel:
        """Rank 0: listen, publish the address in `store`, accept every follower.

        `check()` runs every second of waiting (it raises when a follower died)."""
        lsock = socket.create_server((host, 0))
        lsock.settimeout(1.0)
        try:
            port = lsock.getsockname()[1]
            store.set(key, f"{host}:{port}")
            socks: list[socket.socket | None] = [None] * (world_size - 1)
            for _ in range(world_size - 1):
                while True:
                    try:
                        s, _ = lsock.accept()
                        break
                    except TimeoutError:
                        if check is not None:
                            check()
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = struct.unpack("<I", _read_exact(s, 4))[0]
                socks[peer - 1] = s
        finally:
            lsock.close()
        return cls([s for s in socks if s is not None], 0)

    @classmethod
    def connect(cls, store: dist.Store, rank: int,
                key: str = "dendrite/plan_channel") -> PlanChannel:
        """A follower: connect to rank 0's published address."""
        host, port = store.get(key).decode().rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(struct.pack("<I", rank))
        return cls([s], rank)

    def send(self, msg: bytes) -> None:
        """Rank 0: one message to every follower (BrokenPipeError/ConnectionError
        when a follower is gone)."""
        framed = _LEN.pack(len(msg)) + msg
        for s in self.socks:
            s.sendall(framed)

    def recv(self) -> bytearray | None:
        """A follower: the next message, or None once rank 0 is gone."""
        s = self.socks[0]
        try:
            head = _read_exact(s, _LEN.size)
            return _read_exact(s, _LEN.unpack(head)[0])  # writable: numpy views
        except (ConnectionError, EOFError, OSError):
            return None

    def close(self) -> None:
        """Close every socket (idempotent)."""
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        self.socks = []


def _read_exact(s: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = s.recv_into(view[got:])
        if k == 0:
            raise EOFError("peer closed the plan channel")
        got += k
    return buf
