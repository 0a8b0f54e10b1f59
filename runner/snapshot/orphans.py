"""Objects of a store that no manifest lists: what a writer killed between its upload and its
publish left behind. A store has no staging folder that a restart clears, so without this they
would be billed forever. The lead removes them when a run starts, once they are older than
ORPHAN_AGE, a day: a live writer publishes well within that time (S3 dates a multipart object
by the start of its upload, so the margin covers the longest upload, and any clock skew).
Incomplete S3 multipart uploads of ours are aborted under the same rule, since their parts are
billed but never shown.

Only names the store's uploads take (its `OURS` pattern) are candidates. Every object name the
manifest mentions is kept, in valid entries or not. Without a readable manifest nothing is
removed: objects whose manifest was lost are still a user's data."""

from __future__ import annotations

import datetime
import re
from typing import Any, Iterable, Optional

ORPHAN_AGE = 24 * 3600.0  # seconds


def listed_objects(manifest: Any) -> set[str]:
    """Every object name the manifest mentions, anywhere in it."""
    found: set[str] = set()
    todo = [manifest]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "object" and isinstance(value, str):
                    found.add(value)
                else:
                    todo.append(value)
        elif isinstance(node, list):
            todo.extend(node)
    return found


def modified(info: dict) -> Optional[float]:
    """When the store last wrote an object (s3fs, adlfs, gcsfs spell it differently); None if unknown."""
    for key in ("LastModified", "last_modified", "updated", "mtime", "Initiated"):
        value = info.get(key)
        if isinstance(value, str):
            try:
                value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def orphaned(found: Iterable[tuple[str, dict]], ours: re.Pattern, listed: set[str], now: float) -> list[str]:
    """Of `found` ((name under the prefix, the store's info)), those named as `ours`, unlisted, and old enough."""
    gone = []
    for name, info in found:
        written = modified(info)
        if ours.fullmatch(name) and name not in listed and written is not None and now - written > ORPHAN_AGE:
            gone.append(name)
    return sorted(gone)
