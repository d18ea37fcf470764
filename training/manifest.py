"""What a complete checkpoint holds, and the check that it still holds it.

    manifest.json   {"format": 1, "algorithm": "crc32", "files": {"model.safetensors": {"size": N, "crc32": "..."}, ...}}
    COMPLETE        "manifest crc32 <checksum of manifest.json>"   (written last, after manifest.json)

Every file of the folder is listed with its size and a CRC-32 of its bytes. The marker carries the manifest's own
checksum, so a damaged, truncated or missing manifest is caught as well as a damaged file. CRC-32 (zlib) is for
damage, not for an adversary: bit rot, a copy cut short, a disk that filled up under another tool. It streams at
about 2 GB/s on one core here (BENCHMARKS.md, section checkpoints), against ~1 GB/s for sha256 and ~0.6 for blake2b.

A marker reading "ok" is a checkpoint written before manifests existed: it is accepted unverified.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
ALGORITHM = "crc32"
_BLOCK = 16 << 20            # read 16 MiB at a time: few system calls, little memory


class CheckpointDamaged(ValueError):
    """A checkpoint folder does not hold what its manifest says; the message names the file and the reason."""


def file_checksum(path: Path) -> str:
    """CRC-32 of a file's bytes, read in big blocks, as 8 hex digits."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def write_manifest(folder: Path) -> str:
    """Checksum every file of `folder` (recursively), write manifest.json (fsynced); returns the marker text."""
    folder = Path(folder)
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name not in (MARKER, MANIFEST):
            files[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, ALGORITHM: file_checksum(f)}
    body = json.dumps({"format": 1, "algorithm": ALGORITHM, "files": files}, indent=1) + "\n"
    with open(folder / MANIFEST, "w") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    return f"manifest {ALGORITHM} {file_checksum(folder / MANIFEST)}\n"


def read_manifest(folder: Path) -> dict | None:
    """The manifest's file table after checking it against the marker; None for an old checkpoint (marker "ok").

    Raises:
        CheckpointDamaged naming the marker or the manifest when either is missing or does not match
    """
    folder = Path(folder)
    marker = folder / MARKER
    try:
        text = marker.read_text(errors="replace").strip()
    except OSError as err:
        raise CheckpointDamaged(f"{marker}: unreadable ({err.strerror or err})") from None
    if text == "ok":
        return None
    parts = text.split()
    if len(parts) != 3 or parts[0] != "manifest" or parts[1] != ALGORITHM:
        raise CheckpointDamaged(f"{marker}: damaged (expected 'manifest {ALGORITHM} <checksum>', "
                                f"found {text[:40]!r})")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointDamaged(f"{manifest}: missing (the marker says the folder was complete)")
    if file_checksum(manifest) != parts[2]:
        raise CheckpointDamaged(f"{manifest}: damaged (its checksum does not match the one in {MARKER})")
    try:
        return json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointDamaged(f"{manifest}: damaged ({err})") from None


def verify(folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Check every file the manifest lists (but `skip`): present, the recorded size, the recorded checksum.

    Raises:
        CheckpointDamaged naming the first file that is missing, of another size, or of another checksum
    """
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        return
    for name, want in files.items():        # sizes first: a truncated file is found without reading anything
        if name in skip:
            continue
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            raise CheckpointDamaged(f"{path}: missing") from None
        if size != want["size"]:
            raise CheckpointDamaged(f"{path}: {size:,} bytes, the manifest says {want['size']:,} "
                                    f"(cut short or overwritten)")
    for name, want in files.items():
        if name in skip:
            continue
        try:
            got = file_checksum(folder / name)
        except OSError as err:
            raise CheckpointDamaged(f"{folder / name}: unreadable ({err.strerror or err})") from None
        if got != want[ALGORITHM]:
            raise CheckpointDamaged(f"{folder / name}: damaged (checksum {got}, the manifest says "
                                    f"{want[ALGORITHM]})")


def checkpoint_bytes(folder: Path) -> int:
    """Bytes the files of a folder take (what another checkpoint like it needs)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
