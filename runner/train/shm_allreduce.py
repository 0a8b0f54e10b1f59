"""Gradient all-reduce through shared memory, for DDP workers that share one machine's CPUs.

Why: gloo's all-reduce goes over TCP, and each message is several thread hand-offs (gloo's work
queue, its socket loop, the waiting caller). On a small CPU model that latency, not the compute,
sets the step time: 0.3-0.7 ms per all-reduce of a few floats on a 2-core VM, more than the
forward and backward together. Workers on one host can swap gradients through memory instead.
Gloo itself gained such a path upstream (intra-node SHM all-reduce), and DeepSpeed and vLLM ship
one for CPUs; the PyTorch wheels do not include gloo's yet, so this module is a DDP comm hook.

Protocol, per call (DDP calls the hook for the same buckets in the same order on every rank):
each rank copies its bucket into its own slot of the current buffer, then publishes the call's
sequence number; once every peer has published it, each rank sums all slots in rank order (so
every rank computes bit-identical gradients) and divides by the world size. Two buffers
alternate: a rank can only start writing call n+2 after every peer published n+1, i.e. after
every peer finished reading call n. Publishing after the copy relies on stores becoming visible
in program order, which x86-64 guarantees (TSO; a lock operation in between also drains
write-combining buffers); elsewhere the hook is not used. Buckets larger
than a slot (4 MiB, less when /dev/shm is small) go through in slot-sized chunks; each chunk is
a call of its own (it has its own sequence number).

Every rank must make the same calls in the same order. That is checked, not trusted: with its
sequence number each rank publishes what it reduces (the chunk's and the whole tensor's element
counts, the dtype, the op), written before the sequence number so that a peer which sees the
number also sees the description (the same TSO reasoning as for the data). A rank that finds a
peer's description different from its own raises a RuntimeError naming both calls, on both sides,
instead of summing mismatched bytes. Descriptions alternate between two places by call parity,
like the buffers: a peer that sees call n published can be at most at call n+1, so the
description of call n stays in place until every rank has read it.

Waiting spins for a moment (the peers are usually microseconds apart), then yields the CPU, then
sleeps, checking that every peer process is still alive: a peer that crashed makes this rank fail
within ~0.1 s instead of spinning until the elastic agent kills it. The trainer also sends its
two other small collectives through here: the per-epoch loss and the stop agreement.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as real objects.
import os
import platform
import threading
import time
import uuid
from typing import Optional

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
DEFAULT_MAX_BYTES = 4 << 20  # per slot; larger tensors go through in chunks
MIN_SLOT_BYTES = 64 << 10
FLAG_STRIDE = 8  # int64s per rank's flag: one 64-byte cache line each, no false sharing
# A rank's flag line: [sequence number, then per call parity p: words 1+2p (the whole tensor's
# element count) and 2+2p (the chunk's element count << 16 | dtype code << 8 | op code)].
_OPS = ("sum", "max")
# Codes for every dtype this torch knows, in a fixed order (the ranks share one torch build); 0: none.
_DTYPES = tuple(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str))
assert len(_DTYPES) < 255
SPIN_SECONDS = 0.001
YIELD_SECONDS = 0.02
SLEEP_SECONDS = 0.0002
LIVENESS_EVERY = 0.1


def unavailable_reason(device: str, single_host: bool) -> Optional[str]:
    """Why the shared-memory path cannot be used here, or None when it can."""
    if device != "cpu":
        return "the workers train on GPUs (NCCL is used)"
    if not single_host:
        return "launch=multinode may place the workers on several machines"
    if platform.system() != "Linux" or not os.path.isdir(SHM_DIR):
        return f"it needs Linux with {SHM_DIR}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "it relies on x86-64's store ordering"
    if not _fit_slot_bytes(DEFAULT_MAX_BYTES, 2):  # even the smallest segment (two ranks) would not fit
        stat = os.statvfs(SHM_DIR)
        return f"too little free room in {SHM_DIR} ({stat.f_bavail * stat.f_frsize >> 20} MiB free)"
    return None


class SharedMemoryAllreduce:
    """State of `shm_allreduce_hook`: the mapped segment and the call counter.

    Build it with `create()` (collective), which returns None when /dev/shm has too little room."""

    def __init__(
        self, memory: torch.Tensor, slot_bytes: int, timeout: float, group: Optional[dist.ProcessGroup]
    ) -> None:
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.slot_bytes = slot_bytes
        self.timeout, self.group = timeout, group
        header = _header_bytes(self.world_size)
        words = memory[:header].view(torch.int64)
        # A memoryview reads or writes one int64 in about half the time numpy's indexing takes
        # (each is one aligned 8-byte load or store); the flags are on the hot path.
        self._flags = memoryview(words[: FLAG_STRIDE * self.world_size].numpy()).cast("B").cast("q")
        self._pids = words[FLAG_STRIDE * self.world_size :].numpy()
        self._data = memory[header:]
        # (dtype, numel, parity) -> (the ranks' slot views, the chunk's description word without the op)
        self._views: dict[tuple, tuple[list[torch.Tensor], int]] = {}
        self.seq = 0
        self._fence = threading.Lock()
        self._pids[self.rank * FLAG_STRIDE] = os.getpid()
        dist.barrier(group)  # every pid is written before anyone waits on a peer
        self._peers = [p for p in range(self.world_size) if p != self.rank]
        self._peer_lines = [(p, p * FLAG_STRIDE) for p in self._peers]
        self._peer_pids = {p: int(self._pids[p * FLAG_STRIDE]) for p in self._peers}

    @classmethod
    def create(
        cls, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 600.0, group: Optional[dist.ProcessGroup] = None
    ) -> Optional["SharedMemoryAllreduce"]:
        """Rank 0 sizes and creates a file in /dev/shm, every rank maps it, rank 0 unlinks it at
        once: nothing is left behind even if a worker is killed later. Collective."""
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        plan: list = [None, 0]
        if rank == 0:
            slot_bytes = _fit_slot_bytes(max_bytes, world_size)
            if slot_bytes:
                plan = [os.path.join(SHM_DIR, f"runner-allreduce-{uuid.uuid4().hex}"), slot_bytes]
                with open(plan[0], "wb") as f:
                    f.truncate(_segment_bytes(world_size, slot_bytes))
        dist.broadcast_object_list(plan, src=0, group=group)
        path, slot_bytes = plan
        if path is None:
            return None
        try:
            memory = torch.from_file(path, shared=True, size=_segment_bytes(world_size, slot_bytes), dtype=torch.uint8)
        finally:
            dist.barrier(group)
            if rank == 0:
                os.unlink(path)
        return cls(memory, slot_bytes, timeout, group)

    def _slots(self, buffer: torch.Tensor, parity: int) -> tuple[list[torch.Tensor], int]:
        key = (buffer.dtype, buffer.numel(), parity)
        entry = self._views.get(key)
        if entry is None:
            nbytes = buffer.numel() * buffer.element_size()
            start = parity * self.world_size * self.slot_bytes
            views = [
                self._data[start + r * self.slot_bytes : start + r * self.slot_bytes + nbytes].view(buffer.dtype)
                for r in range(self.world_size)
            ]
            entry = self._views[key] = (views, buffer.numel() << 16 | (_DTYPES.index(buffer.dtype) + 1) << 8)
        return entry

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.is_contiguous()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) of `tensor` over all ranks, in place; every rank gets the same bits.
        Collective; `tensor` must `fit`. Tensors larger than a slot go through in slot-sized chunks."""
        if self.world_size == 1:
            return tensor
        if op == "sum":
            op_code, combine = 0, torch.add
        elif op == "max":
            op_code, combine = 1, torch.maximum
        else:
            raise ValueError(f"op must be 'sum' or 'max', not {op!r}")
        flat = tensor.view(-1)
        total = flat.numel()
        per_chunk = max(1, self.slot_bytes // flat.element_size())
        # An empty tensor still makes one (empty) call, so that it is matched against the peers' calls.
        for start in range(0, max(total, 1), per_chunk):
            self._reduce_chunk(flat[start : start + per_chunk], total, op_code, combine)
        return tensor

    def _reduce_chunk(self, flat: torch.Tensor, total: int, op_code: int, combine) -> None:
        self.seq += 1
        parity = self.seq & 1
        slots, shape_word = self._slots(flat, parity)
        slots[self.rank].copy_(flat)
        # Describe the call, then publish. Publish only after the copy and the description are
        # visible: a lock operation is a LOCK-prefixed instruction, which also drains
        # write-combining buffers (should the copy use non-temporal stores), and x86-64 keeps the
        # flag's store after the earlier ones (TSO).
        flags, word = self._flags, shape_word | op_code
        own = self.rank * FLAG_STRIDE + 1 + 2 * parity
        flags[own] = total
        flags[own + 1] = word
        with self._fence:
            flags[self.rank * FLAG_STRIDE] = self.seq
        for peer, line in self._peer_lines:
            if flags[line] < self.seq:
                self._wait_for(peer)
            # x86-64 does not reorder loads: having seen the sequence number, this reads the
            # description written before it (the peer cannot overwrite it before this rank's next call).
            described = line + 1 + 2 * parity
            if flags[described] != total or flags[described + 1] != word:
                self._mismatch(peer, int(flags[described]), int(flags[described + 1]), total, word)
        combine(slots[0], slots[1], out=flat)
        for r in range(2, self.world_size):
            combine(flat, slots[r], out=flat)

    def _mismatch(self, peer: int, peer_total: int, peer_word: int, total: int, word: int) -> None:
        calls = {self.rank: _describe(total, word), peer: _describe(peer_total, peer_word)}
        named = ", ".join(f"rank {r} reduces {calls[r]}" for r in sorted(calls))
        raise RuntimeError(
            f"shared-memory all-reduce mismatch at call {self.seq}: {named}; "
            "every rank must make the same collective calls in the same order"
        )

    def allreduce_mean_(self, buffer: torch.Tensor) -> torch.Tensor:
        """Average `buffer` over all ranks, in place; every rank gets the same bits."""
        return self.all_reduce_(buffer).div_(self.world_size)

    def _wait_for(self, peer: int) -> None:
        flags, index, seq = self._flags, peer * FLAG_STRIDE, self.seq
        started = time.perf_counter()
        spin_until, yield_until = started + SPIN_SECONDS, started + YIELD_SECONDS
        while flags[index] < seq:
            if time.perf_counter() > spin_until:
                break
        next_check = started + LIVENESS_EVERY
        while flags[index] < seq:
            now = time.perf_counter()
            if now < yield_until:
                os.sched_yield()
                continue
            time.sleep(SLEEP_SECONDS)
            if now > next_check:
                next_check = now + LIVENESS_EVERY
                if not _alive(self._peer_pids[peer]):
                    raise RuntimeError(
                        f"rank {peer} (pid {self._peer_pids[peer]}) exited while this rank waited for it in a shared-memory all-reduce"
                    )
                if now - started > self.timeout:
                    raise TimeoutError(
                        f"rank {peer} did not reach a shared-memory all-reduce within {self.timeout:.0f} s"
                    )


def shm_allreduce_hook(state: SharedMemoryAllreduce, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The comm hook: `ddp_model.register_comm_hook(SharedMemoryAllreduce.create(), shm_allreduce_hook)`."""
    buffer = bucket.buffer()
    if not state.fits(buffer):  # not a CPU tensor: the backend's own all-reduce
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return default_hooks.allreduce_hook(state.group, bucket)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(state.allreduce_mean_(buffer))
    return future


def _describe(total: int, word: int) -> str:
    """A call as published in a flag line, in words: "1024 float32 elements (sum)"."""
    chunk, dtype_code, op_code = word >> 16, word >> 8 & 0xFF, word & 0xFF
    dtype = (
        str(_DTYPES[dtype_code - 1]).removeprefix("torch.")
        if 0 < dtype_code <= len(_DTYPES)
        else f"dtype #{dtype_code}"
    )
    op = _OPS[op_code] if op_code < len(_OPS) else f"op #{op_code}"
    text = f"{total} {dtype} elements ({op})"
    return text if chunk == total else f"{text}, a chunk of {chunk} of them"


def _alive(pid: int) -> bool:
    """A process that exited (or is a zombie waiting to be reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")


def _header_bytes(world_size: int) -> int:
    return 2 * FLAG_STRIDE * world_size * 8  # a flag and a pid per rank, a cache line each


def _segment_bytes(world_size: int, slot_bytes: int) -> int:
    return _header_bytes(world_size) + 2 * world_size * slot_bytes


def _fit_slot_bytes(max_bytes: int, world_size: int) -> int:
    """The slot size, shrunk so the segment takes at most a quarter of /dev/shm's free room
    (containers often get 64 MB; running out there would crash a worker with SIGBUS). 0: too little."""
    stat = os.statvfs(SHM_DIR)
    budget = stat.f_bavail * stat.f_frsize // 4 - _header_bytes(world_size)
    slot = min(_round_up(max_bytes, 64), budget // (2 * world_size) // 64 * 64)
    return slot if slot >= MIN_SLOT_BYTES else 0


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
