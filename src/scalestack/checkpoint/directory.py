"""Where checkpoints live on disk, and how one becomes visible only when it is complete.

A checkpoint is a DCP directory plus ``scalestack.json``, written last, which lists every file with its size
and CRC-32. It is written under a hidden temporary name (``.NAME.incomplete``) next to its final name and
renamed to it once every rank has finished writing, so a crash at any point of a save leaves the previous
checkpoints untouched and never leaves a visible half-written one. Replacing a checkpoint of the same name
moves the old one aside (``.NAME.replaced``, still complete and still found by ``resolve``) before the
rename and deletes it after.

``resolve`` picks, among the visible complete checkpoints of a directory, the one saved last;
``prune`` keeps the newest ``keep_last`` of a series (names that differ only in their numbers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

MARKER = "scalestack.json"
FORMAT = "scalestack-checkpoint"
VERSION = 1
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A path that is not a usable checkpoint: missing, incomplete, truncated or corrupt."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    saved_at_ns: int
    files: dict[str, tuple[int, int]]  # name -> (size in bytes, CRC-32)
    optimizers: dict[str, str]  # key prefix -> the optimizer's class


def temporary_path(final: Path) -> Path:
    return final.parent / f".{final.name}.incomplete"


def replaced_path(final: Path) -> Path:
    """Where a checkpoint waits, complete, while a new one of its name takes its place."""
    return final.parent / f".{final.name}.replaced"


def crc32_of(path: Path) -> int:
    crc, buffer = 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sums(directory: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """Size and CRC-32 of each file, while another thread makes them durable: DCP writes them without
    fsync, so the disk flushes while the CPU sums (both must finish before the checkpoint is published)."""
    failed: list[BaseException] = []

    def flush() -> None:  # a plain thread: an executor refuses work while the interpreter exits
        try:
            for n in names:
                _fsync(directory / n)
        except BaseException as e:  # noqa: BLE001 -- raised in the caller below
            failed.append(e)

    flusher = threading.Thread(target=flush, name="scalestack-fsync")
    flusher.start()
    sums = {name: ((directory / name).stat().st_size, crc32_of(directory / name)) for name in names}
    flusher.join()
    if failed:
        raise failed[0]
    return sums


def check_target(final: Path) -> None:
    """``final`` may be written: it does not exist, or it is a complete checkpoint (which it replaces). Any
    other directory or file is the user's: never replaced."""
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        return  # free, or an empty directory made in advance (mkdtemp, a launcher's output directory)
    try:
        read(final)
    except CheckpointError:
        holds = " (it holds checkpoints: save into a new name under it)" if complete_checkpoints(final) else ""
        raise CheckpointError(
            f"{final} exists and is not a scalestack checkpoint{holds}; a save replaces only a checkpoint of the "
            "same name: choose another path"
        ) from None


def publish(tmp: Path, final: Path, world_size: int, files: dict[str, tuple[int, int]],
            optimizers: dict[str, str]) -> None:  # fmt: skip
    """Write the marker into the finished temporary directory and rename it to its final name (rank 0 only,
    after every rank has written its files)."""
    listed = {n for n in os.listdir(tmp)} - {MARKER}
    unlisted = sorted(listed - files.keys())
    if unlisted:
        raise CheckpointError(f"{tmp} holds files no rank reported writing: {unlisted[:5]}")
    marker = {"format": FORMAT, "version": VERSION, "saved_at_ns": time.time_ns(), "world_size": world_size,
              "optimizers": optimizers,
              "files": {n: {"bytes": s, "crc32": c} for n, (s, c) in sorted(files.items())}}  # fmt: skip
    with open(tmp / MARKER, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    replaced = replaced_path(final)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if final.exists():
        check_target(final)  # checked before the save too: this guards a directory made since
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync(final.parent)
    if replaced.exists():
        shutil.rmtree(replaced)


def read(path: Path) -> Checkpoint:
    """The checkpoint at ``path``, with a clear error when it is not one (or not a complete one)."""
    marker = path / MARKER
    if not path.exists():
        replaced = replaced_path(path)
        if (replaced / MARKER).exists():  # a crash while this checkpoint was being replaced: the old copy
            return read(replaced)
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    if not marker.exists():
        if (path / ".metadata").exists():
            raise CheckpointError(
                f"{path} is a torch.distributed.checkpoint directory without {MARKER} (not saved by "
                "scalestack.checkpoint.save); load it with torch.distributed.checkpoint.load(model.state_dict(), "
                "checkpoint_id=...) and model.load_state_dict(...)"
            )
        raise CheckpointError(f"{path} is not a scalestack checkpoint (it has no {MARKER})")
    try:
        meta = json.loads(marker.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        if meta.get("version", 0) > VERSION:
            raise CheckpointError(
                f"{path} was written by a newer scalestack (format version {meta['version']} > {VERSION}); upgrade"
            )
        files = {n: (int(v["bytes"]), int(v["crc32"])) for n, v in meta["files"].items()}
        optimizers = {str(k): str(v) for k, v in meta.get("optimizers", {}).items()}
        return Checkpoint(path, int(meta["saved_at_ns"]), files, optimizers)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{marker} is damaged ({e}); the checkpoint cannot be trusted") from None


def verify(ckpt: Checkpoint, names: list[str] | None = None, sums: bool = True) -> None:
    """Every listed file (or those of ``names``) exists with its recorded size and (``sums``) CRC-32."""
    for name in sorted(ckpt.files) if names is None else names:
        size, crc = ckpt.files[name]
        f = ckpt.path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {ckpt.path} is damaged: {name} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint {ckpt.path} is damaged: {name} has {actual} bytes, {size} were written "
                f"({'truncated' if actual < size else 'grown'})"
            )
        if sums and crc32_of(f) != crc:
            raise CheckpointError(f"checkpoint {ckpt.path} is damaged: {name} does not match its CRC-32 (corrupt)")


def complete_checkpoints(directory: Path) -> list[Checkpoint]:
    """The visible complete checkpoints directly under ``directory``, oldest first."""
    found = []
    for child in directory.iterdir() if directory.is_dir() else []:
        hidden = child.name.startswith(".")
        if (hidden and not child.name.endswith(".replaced")) or not (child / MARKER).exists():
            continue  # a save in progress or one that died; a replaced one is complete (a crash mid-replace)
        try:
            found.append(read(child))
        except CheckpointError:
            continue  # a damaged marker: not a complete checkpoint
    return sorted(found, key=lambda c: (c.saved_at_ns, c.path.name))


def resolve(path: Path) -> Checkpoint:
    """``path`` itself when it is a checkpoint, else the newest complete checkpoint directly under it."""
    if (path / MARKER).exists() or (path / ".metadata").exists() or not path.is_dir():
        return read(path)
    found = complete_checkpoints(path)
    if found:
        return found[-1]
    partial = sorted(c.name for c in path.iterdir() if c.name.endswith(".incomplete"))
    hint = f" (only saves that did not finish: {partial[:3]})" if partial else ""
    raise CheckpointError(f"{path} holds no complete scalestack checkpoint{hint}")


def series(name: str) -> str:
    """The series a checkpoint name belongs to: the name with every number replaced (epoch1-step100 and
    epoch3-step400 are one series; best is another)."""
    return re.sub(r"\d+", "#", name)


def prune(directory: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints of ``keep``'s series under ``directory``
    (names equal to ``keep``'s but for their numbers: step_100, step_200; never ``keep`` itself, never
    another series such as "best"). Each goes out of sight by a rename before it is deleted, so a crash
    mid-delete leaves no damaged visible checkpoint; leftovers of such crashes are deleted here too."""
    for trash in directory.glob(".*.deleting-*"):
        shutil.rmtree(trash, ignore_errors=True)
    mine = [c for c in complete_checkpoints(directory) if series(c.path.name) == series(keep.name)
            and not c.path.name.startswith(".")]  # fmt: skip
    doomed = [c.path for c in mine[: max(len(mine) - keep_last, 0)] if c.path != keep]
    for p in doomed:
        trash = p.parent / f".{p.name}.deleting-{uuid.uuid4().hex[:8]}"
        os.rename(p, trash)
        shutil.rmtree(trash)
