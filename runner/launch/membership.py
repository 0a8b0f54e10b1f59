"""What a node of a launch=multinode job says about the others: what it waits for at the
rendezvous (and for how long), and which node left or joined between two rounds.

torch's agent waits at the rendezvous in silence and, when a node is lost, restarts its workers
with no word of which node went. Here the agent (runner.launch.elastic.RestartPolicyAgent) writes
each round's members into that round's store (`runner/node/<group rank>`: the scheduler's node
rank, the host name, a process id) and compares them with the round before.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

log = logging.getLogger("runner")
REPORT_AFTER = (5, 15, 30, 60, 120, 300)  # seconds waited when "still waiting" is said again, then every 300 s


@dataclass(frozen=True)
class Rendezvous:
    """The rendezvous this node takes part in, as the messages name it."""

    endpoint: str
    run_id: str
    timeout: int
    min_nodes: int
    max_nodes: int
    node: Optional[int] = None  # the scheduler's rank of this node (SLURM_NODEID, ...), if it gave one

    def nodes(self) -> str:
        return str(self.min_nodes) if self.min_nodes == self.max_nodes else f"{self.min_nodes} (up to {self.max_nodes})"


def joined(handler: Any) -> Optional[int]:
    """How many nodes are in the rendezvous round this handler last read, or None when it cannot say
    (a handler that is not torch's dynamic one, or another torch)."""
    try:
        return len(handler._state_holder.state.participants)
    except AttributeError:
        return None


@contextmanager
def waiting_reported(rdzv: Rendezvous, handler: Any) -> Iterator[None]:
    """Say what this node waits for while the block (the agent's rendezvous) runs, and again while it goes on."""
    done = threading.Event()
    started = time.monotonic()

    def line(waited: Optional[float]) -> str:
        there = (joined(handler) if waited is not None else None) or 1  # this node at least
        missing = rdzv.min_nodes - there
        more = rdzv.max_nodes - there
        what = (
            f"{missing} of {rdzv.nodes()} nodes" if missing > 0 else f"up to {more} more node{'s' if more > 1 else ''}"
        )
        text = (
            f"waiting for {what} at {rdzv.endpoint}, rendezvous id {rdzv.run_id}, "
            f"timeout {rdzv.timeout} s (launch.rdzv_timeout)"
        )
        return text if waited is None else f"still {text}: {waited:.0f} s waited"

    def watch() -> None:
        marks = list(REPORT_AFTER)
        while True:
            wait_for = (marks[0] if marks else (time.monotonic() - started) + REPORT_AFTER[-1]) - (
                time.monotonic() - started
            )
            if done.wait(max(wait_for, 0)):
                return
            if marks:
                marks.pop(0)
            log.info(line(time.monotonic() - started))

    log.info(line(None))
    thread = threading.Thread(target=watch, name="runner-rendezvous-wait", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1)


class Members:
    """The nodes of each rendezvous round this agent took part in, and what changed between rounds."""

    def __init__(self, rdzv: Rendezvous) -> None:
        self.rdzv = rdzv
        self.me = {"node": rdzv.node, "host": socket.gethostname(), "id": f"{socket.gethostname()}:{os.getpid()}"}
        self.nodes: Optional[list[dict]] = None

    def new_round(self, store: Any, group_rank: int, world: int, lost_step: Optional[int]) -> None:
        """After a rendezvous: publish this node, read the others, and say who left or joined."""
        me = {**self.me, "node": self.me["node"] if self.me["node"] is not None else group_rank}
        try:
            store.set(f"runner/node/{group_rank}", json.dumps(me))
            nodes = [json.loads(store.get(f"runner/node/{rank}")) for rank in range(world)]
        except Exception:  # the store's own errors surface in the agent; the names are only for the messages
            return
        before, self.nodes = self.nodes, nodes
        if before is None:
            return
        now = {n["id"] for n in nodes}
        was = {n["id"] for n in before}
        for node in before:
            if node["id"] not in now:
                at = f" at step {lost_step}" if lost_step is not None else ""
                log.warning(
                    "node %s (%s) left%s: continuing on %d node%s, from the last snapshot",
                    node["node"],
                    node["host"],
                    at,
                    world,
                    "" if world == 1 else "s",
                )
        for node in nodes:
            if node["id"] not in was:
                log.info(
                    "node %s (%s) joined: continuing on %d nodes, from the snapshot written for it",
                    node["node"],
                    node["host"],
                    world,
                )
