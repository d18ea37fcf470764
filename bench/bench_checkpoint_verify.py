"""How long verifying a checkpoint of the `large` preset takes (training/manifest.py), and the checksum speeds.

    python bench/bench_checkpoint_verify.py [--dir /tmp/verify-bench] [--params 336806912]

Writes a folder with files of a large checkpoint's sizes (model.safetensors: params x 4 bytes fp32;
training_state.pt: two AdamW moments, params x 8 bytes) filled with random bytes, writes its manifest, then times
verify() (warm page cache: the case right after a save or a second load) and each candidate checksum in MB/s.
The folder is deleted at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training import manifest  # noqa: E402


def write_random(path: Path, size: int, block: int = 64 << 20) -> None:
    chunk = os.urandom(block)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[:min(block, left)])
            left -= block


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/verify-bench")
    p.add_argument("--params", type=int, default=336_806_912)
    a = p.parse_args()
    d = Path(a.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    try:
        write_random(d / "model.safetensors", a.params * 4)
        write_random(d / "training_state.pt", a.params * 8)
        (d / "config.json").write_text("{}")
        t = time.perf_counter()
        marker = manifest.write_manifest(d)
        write_s = time.perf_counter() - t
        (d / manifest.MARKER).write_text(marker)
        total = manifest.checkpoint_bytes(d)
        for skip, what in (((), "full (resume)"), (("training_state.pt",), "weights only (generate, init_from)")):
            t = time.perf_counter()
            manifest.verify(d, skip=skip)
            s = time.perf_counter() - t
            n = total if not skip else (d / "model.safetensors").stat().st_size
            print(f"verify {what}: {n / 1e9:.2f} GB in {s:.2f} s = {n / 1e6 / s:,.0f} MB/s")
        print(f"manifest written in {write_s:.2f} s for {total / 1e9:.2f} GB")
        data = (d / "model.safetensors").read_bytes()[: 512 << 20]
        for name, fn in (("crc32", zlib.crc32), ("adler32", zlib.adler32),
                         ("sha256", lambda b: hashlib.sha256(b).digest()),
                         ("blake2b", lambda b: hashlib.blake2b(b).digest())):
            t = time.perf_counter()
            fn(data)
            s = time.perf_counter() - t
            print(f"{name:8s} {len(data) / 1e6 / s:,.0f} MB/s (in memory)")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
