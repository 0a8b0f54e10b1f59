"""Which records of an epoch each reader (one loader worker of one rank) reads: the sharding rule.

A reader is a slot `rank * workers + worker` of `ranks x workers` slots. The epoch's shard order
is the sorted file list, permuted from (seed, epoch) when shuffling. With n shards and S slots:

- the first `(n // S) * S` shards are whole rounds: shard i of the order goes to slot `i % S`;
- the `n % S` shards left over (the uneven tail, or every shard when n < S) are read by every
  slot, slot s taking records s, s+S, s+2S, ... of each, so no slot is left idle.

Every record of the epoch belongs to exactly one slot. What a slot still has to read is a list of
pieces `[shard, start, step, offset]` (records start, start+step, ... of the shard; `offset` is
where the reader may seek to find record `start`, 0 if unknown), so the position of a reader is
just its remaining pieces. After a resume on another number of ranks or workers the remaining
pieces of every old slot are striped over the new slots (`redeal`): nothing read twice, nothing
skipped, near-equal shares, but not in the old order.
"""

from __future__ import annotations

from typing import Any

import torch

# [shard index, first record, step, byte offset of the first record (0 = unknown)], and a fifth
# element when the first record was partly given: how many of its samples (or tokens, packing).
Piece = list


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's order of shard indices."""
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=gen).tolist()


def slot_pieces(n: int, slots: int, slot: int, seed: int, epoch: int, shuffle: bool) -> list[Piece]:
    """The pieces slot `slot` of `slots` reads in a fresh epoch (the rule in the module's docstring)."""
    order = shard_order(n, seed, epoch, shuffle)
    whole = (n // slots) * slots
    pieces = [[shard, 0, 1, 0] for shard in order[slot:whole:slots]]
    pieces += [[shard, slot, slots, 0] for shard in order[whole:]]
    return pieces


def redeal(old: list[dict[str, Any]], slots: int) -> list[dict[str, Any]]:
    """Every old slot's remaining work (states with `pieces` and `carry`) dealt to `slots` new slots.

    Each remaining piece is striped over the new slots (record k of it to slot (k + p) % slots for
    the p-th piece), so every new reader gets a near-equal share of every piece and the ranks end
    the epoch together; a record partly given keeps its count with the sub-piece that starts at it."""
    new: list[dict[str, Any]] = [{"pieces": [], "carry": []} for _ in range(slots)]
    pieces = [p for state in old for p in state["pieces"]]
    for p, (shard, start, step, offset, *skip) in enumerate(pieces):
        for k in range(slots):
            sub = [shard, start + k * step, step * slots, offset if k == 0 else 0]
            if k == 0 and skip and skip[0]:
                sub.append(skip[0])
            new[(k + p) % slots]["pieces"].append(sub)
    carries = [state["carry"] for state in old if state.get("carry")]
    for i, carry in enumerate(carries):  # tokens a packer had read but not yet emitted
        new[i % slots]["carry"] = new[i % slots]["carry"] + list(carry)
    return new
