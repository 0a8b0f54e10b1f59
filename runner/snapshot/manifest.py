"""The manifest's schema: which entries may be trusted, opened or deleted at all.

The manifest lives in the run directory, so whoever can write there can write it. An entry is only
ever allowed to name one of our own files directly inside the snapshot directory
(snapshot-<digits>.pt, or a folder step-<digits> of shards whose files are listed one by one, each
with its size and sha256, and since block digests exist one sha256 per block); an entry that breaks the schema is reported and dropped, so it is never
opened, never trusted as "the newest version" and never deleted by retention.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Union

from runner.snapshot.format import SnapshotError

FILE_PATTERN = re.compile(r"snapshot-[0-9]+\.pt")  # [0-9], not \d: no other scripts' digits
FOLDER_PATTERN = re.compile(r"step-[0-9]+")  # a sharded version (kind "dcp")
SHARD_FILE_PATTERN = re.compile(r"\.metadata|__[0-9]+_[0-9]+\.distcp|loop\.pt")  # what DCP and the lead write into one
KINDS = ("file", "dcp")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
REQUIRED_COUNTS = ("step", "epoch", "size")


def parse_manifest(data: Union[bytes, str], origin: Union[Path, str]) -> dict[str, Any]:
    """The parsed manifest; SnapshotError (one line, naming `origin`) for anything that is not one."""
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise SnapshotError(f"{origin} is not a valid manifest (not JSON: {_one_line(err)})") from None
    check_top_level(manifest, origin)
    return manifest


def check_top_level(manifest: Any, origin: Union[Path, str]) -> None:
    """Refuse a manifest whose shape is wrong as a whole: nothing in it can be trusted."""
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{origin} is not a valid manifest (top level is {_kind(manifest)}, not an object)")
    if "snapshots" not in manifest:
        raise SnapshotError(f"{origin} is not a valid manifest (no 'snapshots' list)")
    if not isinstance(manifest["snapshots"], list):
        raise SnapshotError(
            f"{origin} is not a valid manifest ('snapshots' is {_kind(manifest['snapshots'])}, not a list)"
        )


def validate_manifest(manifest: Any, origin: Union[Path, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(valid entries in manifest order, one problem per invalid entry).

    SnapshotError when the top level is wrong; a bad entry is only reported, so one tampered or
    damaged entry does not hide the good versions beside it. A second entry naming a file already
    named is invalid too: retention deletes by file name, so two entries must never share one."""
    check_top_level(manifest, origin)
    valid, problems, seen = [], [], set()
    for index, entry in enumerate(manifest["snapshots"]):
        problem = entry_problem(entry)
        if problem is None and entry["file"] in seen:
            problem = "another entry already names this file"
        if problem is not None:
            problems.append(f"{origin}: ignoring entry {index} ({describe(entry)}): {problem}")
            continue
        seen.add(entry["file"])
        valid.append(entry)
    return valid, problems


def entry_problem(entry: Any) -> Optional[str]:
    """Why `entry` breaks the schema, or None when it may be used."""
    if not isinstance(entry, dict):
        return f"an entry must be an object, not {_kind(entry)}"
    kind = entry.get("kind", "file")
    if kind not in KINDS:
        return f"'kind' must be one of {', '.join(KINDS)}, not {_shown(kind)}"
    problem = file_name_problem(entry.get("file"), kind)
    if problem is not None:
        return problem
    if kind == "dcp":
        problem = shard_list_problem(entry.get("files"))
        if problem is not None:
            return problem
    for key in REQUIRED_COUNTS:
        if not _is_count(entry.get(key)):
            return f"{key!r} must be an integer >= 0, not {_shown(entry.get(key))}"
    sha = entry.get("sha256")
    if not (isinstance(sha, str) and SHA256_PATTERN.fullmatch(sha)):
        return f"'sha256' must be 64 lowercase hex digits, not {_shown(sha)}"
    return _optional_problem(entry)


def file_name_problem(name: Any, kind: str = "file") -> Optional[str]:
    """Why `name` may not be opened or deleted inside the snapshot directory, or None.

    Only a bare name of our own pattern passes, so no entry can reach outside the directory
    (`../x`, `/etc/x`, `a/b`, NUL tricks) or name a file the runner did not write."""
    if not isinstance(name, str):
        return f"'file' must be a file name, not {_shown(name)}"
    if "\x00" in name or "/" in name or "\\" in name or name in (".", "..") or Path(name).is_absolute():
        return f"'file' must be a plain file name inside the snapshot directory, not {_shown(name)}"
    if kind == "dcp":
        if not FOLDER_PATTERN.fullmatch(name):
            return f"'file' of a sharded version must look like step-<step>, not {_shown(name)}"
    elif not FILE_PATTERN.fullmatch(name):
        return f"'file' must look like snapshot-<step>.pt, not {_shown(name)}"
    return None


def shard_list_problem(files: Any) -> Optional[str]:
    """Why a sharded version's `files` list cannot be trusted, or None: every item names one of
    the files DCP or the lead writes (no paths), once, with its size and sha256."""
    if not isinstance(files, list) or not files:
        return f"'files' must be a non-empty list of {{name, size, sha256}}, not {_shown(files)}"
    seen = set()
    for item in files:
        if not isinstance(item, dict):
            return f"'files' items must be objects, not {_shown(item)}"
        name = item.get("name")
        if not isinstance(name, str) or not SHARD_FILE_PATTERN.fullmatch(name):
            return f"'files' may only name .metadata, __<rank>_<n>.distcp and loop.pt, not {_shown(name)}"
        if name in seen:
            return f"'files' names {name} twice"
        seen.add(name)
        if not _is_count(item.get("size")):
            return f"'size' of {name} must be an integer >= 0, not {_shown(item.get('size'))}"
        sha = item.get("sha256")
        if not (isinstance(sha, str) and SHA256_PATTERN.fullmatch(sha)):
            return f"'sha256' of {name} must be 64 lowercase hex digits, not {_shown(sha)}"
        problem = _blocks_problem(item, name)
        if problem is not None:
            return problem
        if "object" in item and not isinstance(item["object"], str):
            return f"'object' of {name} must be a string, not {_shown(item['object'])}"
    if not {".metadata", "loop.pt"} <= seen:
        return "'files' must list .metadata and loop.pt"
    return None


def _blocks_problem(item: dict[str, Any], name: str) -> Optional[str]:
    """Block digests are optional (entries written before them have none); when there, one sha256
    per `block_size` bytes of the file, the last block shorter."""
    if "block_size" not in item and "blocks" not in item:
        return None
    size, block_size, blocks = item["size"], item.get("block_size"), item.get("blocks")
    if not _is_count(block_size) or block_size == 0:
        return f"'block_size' of {name} must be an integer > 0, not {_shown(block_size)}"
    if not isinstance(blocks, list) or len(blocks) != -(-size // block_size):
        return f"'blocks' of {name} must list one sha256 per {block_size} bytes, not {_shown(blocks)}"
    if not all(isinstance(b, str) and SHA256_PATTERN.fullmatch(b) for b in blocks):
        return f"'blocks' of {name} must be 64 lowercase hex digits each"
    return None


def describe(entry: Any) -> str:
    """A short name for an entry in a warning: its file when it has one."""
    if isinstance(entry, dict) and "file" in entry:
        return f"file {_shown(entry['file'])}"
    return _shown(entry)


def _optional_problem(entry: dict[str, Any]) -> Optional[str]:
    for flag in ("milestone", "best"):
        if flag in entry and not isinstance(entry[flag], bool):
            return f"{flag!r} must be true or false, not {_shown(entry[flag])}"
    monitor = entry.get("monitor")
    if monitor is not None and not (
        isinstance(monitor, dict)
        and isinstance(monitor.get("name"), str)
        and isinstance(monitor.get("value"), (int, float))
        and not isinstance(monitor.get("value"), bool)
    ):
        return f'\'monitor\' must be {{"name": <metric>, "value": <number>}}, not {_shown(monitor)}'
    if "ended" in entry and not isinstance(entry["ended"], str):
        return f"'ended' must be a string, not {_shown(entry['ended'])}"
    if "created" in entry and not isinstance(entry["created"], str):
        return f"'created' must be a string, not {_shown(entry['created'])}"
    seconds = entry.get("commit_seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return f"'commit_seconds' must be a number, not {_shown(seconds)}"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _shown(value: Any, limit: int = 200) -> str:
    """repr, cut short: a warning must stay one readable line whatever the manifest holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__
