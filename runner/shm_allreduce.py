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
than a slot (4 MiB, less when /dev/shm is small) go through in slot-sized chunks.

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
    return None


class SharedMemoryAllreduce:
    """State of `shm_allreduce_hook`: the mapped segment and the call counter.

    Build it with `create()` (collective), which returns None when /dev/shm has too little room."""

    def __init__(self, memory: torch.Tensor, slot_bytes: int, timeout: float, group: Optional[dist.ProcessGroup]) -> None:
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.slot_bytes = slot_bytes
        self.timeout, self.group = timeout, group
        header = _header_bytes(self.world_size)
        words = memory[:header].view(torch.int64)
        self._flags = words[: FLAG_STRIDE * self.world_size].numpy()
        self._pids = words[FLAG_STRIDE * self.world_size:].numpy()
        self._data = memory[header:]
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self.seq = 0
        self._fence = threading.Lock()
        self._pids[self.rank * FLAG_STRIDE] = os.getpid()
        dist.barrier(group)  # every pid is written before anyone waits on a peer
        self._peers = [p for p in range(self.world_size) if p != self.rank]
        self._peer_pids = {p: int(self._pids[p * FLAG_STRIDE]) for p in self._peers}

    @classmethod
    def create(cls, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 600.0,
               group: Optional[dist.ProcessGroup] = None) -> Optional["SharedMemoryAllreduce"]:
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

    def _slots(self, buffer: torch.Tensor, parity: int) -> list[torch.Tensor]:
        key = (buffer.dtype, buffer.numel(), parity)
        views = self._views.get(key)
        if views is None:
            nbytes = buffer.numel() * buffer.element_size()
            start = parity * self.world_size * self.slot_bytes
            views = [self._data[start + r * self.slot_bytes: start + r * self.slot_bytes + nbytes].view(buffer.dtype)
                     for r in range(self.world_size)]
            self._views[key] = views
        return views

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.is_contiguous()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) of `tensor` over all ranks, in place; every rank gets the same bits.
        Collective; `tensor` must `fit`. Tensors larger than a slot go through in slot-sized chunks."""
        if self.world_size == 1:
            return tensor
        flat = tensor.view(-1)
        per_chunk = max(1, self.slot_bytes // flat.element_size())
        for start in range(0, flat.numel(), per_chunk):
            self._reduce_chunk(flat[start: start + per_chunk], op)
        return tensor

    def _reduce_chunk(self, flat: torch.Tensor, op: str) -> None:
        self.seq += 1
        slots = self._slots(flat, self.seq & 1)
        slots[self.rank].copy_(flat)
        # Publish only after the copy is visible: a lock operation is a LOCK-prefixed instruction,
        # which also drains write-combining buffers (should the copy use non-temporal stores),
        # and x86-64 keeps the flag's store after it (TSO).
        with self._fence:
            self._flags[self.rank * FLAG_STRIDE] = self.seq
        for peer in self._peers:
            if self._flags[peer * FLAG_STRIDE] < self.seq:
                self._wait_for(peer)
        combine = torch.add if op == "sum" else torch.maximum
        combine(slots[0], slots[1], out=flat)
        for r in range(2, self.world_size):
            combine(flat, slots[r], out=flat)

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
                    raise RuntimeError(f"rank {peer} (pid {self._peer_pids[peer]}) exited while this rank waited for it in a shared-memory all-reduce")
                if now - started > self.timeout:
                    raise TimeoutError(f"rank {peer} did not reach a shared-memory all-reduce within {self.timeout:.0f} s")


def shm_allreduce_hook(state: SharedMemoryAllreduce, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The comm hook: `ddp_model.register_comm_hook(SharedMemoryAllreduce.create(), shm_allreduce_hook)`."""
    buffer = bucket.buffer()
    if not state.fits(buffer):  # not a CPU tensor: the backend's own all-reduce
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return default_hooks.allreduce_hook(state.group, bucket)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(state.allreduce_mean_(buffer))
    return future


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
