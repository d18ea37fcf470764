"""Corpus statistics: totals over the per-file records, the readable summary (--show_stats) and the JSON form
(--stats_json)."""
from collections import Counter, defaultdict


def compute_totals(records: list[dict], train_tokens: int, val_tokens: int) -> dict:
    """Totals over per-file records (skipped folders are counted apart from files)."""
    files = [r for r in records if r["type"] != "directory"]
    loaded = [r for r in files if r["status"] == "loaded"]
    by_type: dict = defaultdict(lambda: {"files": 0, "loaded": 0, "skipped": 0, "chars": 0, "tokens": 0})
    for r in files:
        t = by_type[r["type"]]
        t["files"] += 1
        t[r["status"]] += 1
        t["chars"] += r["chars"]
        t["tokens"] += r["tokens"]
    return {
        "files": len(files), "loaded": len(loaded), "skipped": len(files) - len(loaded),
        "skipped_folders": len(records) - len(files),
        "bytes_loaded": sum(r["bytes"] for r in loaded), "chars": sum(r["chars"] for r in loaded),
        "tokens": sum(r["tokens"] for r in loaded), "documents": sum(r["documents"] for r in loaded),
        "train_tokens": train_tokens, "val_tokens": val_tokens,
        "replacements": sum(r["replacements"] for r in loaded),
        "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["files"])),
        "skip_reasons": dict(Counter(r["reason"].split(" (")[0] for r in records if r["status"] == "skipped")
                             .most_common()),
    }


def sequences(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens (inputs + shifted targets) that tile n tokens, sharing one token at each
    boundary: every token is a target once per epoch."""
    return max(0, (n_tokens - 1) // seq_len)


def stats_json(records: list[dict], totals: dict, seq_len: int) -> dict:
    """The --stats_json document: {"files": [{path, type, status, reason, chars, tokens, ...}], "totals": {...}}."""
    return {"files": records, "totals": {**totals, "seq_len": seq_len,
                                         "train_sequences": sequences(totals["train_tokens"], seq_len),
                                         "val_sequences": sequences(totals["val_tokens"], seq_len)}}


def summary(records: list[dict], totals: dict, seq_len: int, manifest: dict | None = None, top: int = 10) -> str:
    """A readable report: files per type, characters, tokens, documents, sequences, split, largest files and
    every skipped file with its reason."""
    lines = []
    add = lines.append
    if manifest:
        tok = manifest["tokenizer"]
        add(f"Prepared data   {manifest.get('dir', '')}".rstrip())
        add(f"Tokenizer       {tok['source']} (vocab {tok['vocab_size']:,}, end-of-text id {tok['eot_id']}, "
            f"stored as {manifest['dtype']})")
    add(f"Files           {totals['files']:,} ({totals['loaded']:,} loaded, {totals['skipped']:,} skipped)"
        + (f"; {totals['skipped_folders']} folders skipped" if totals["skipped_folders"] else ""))
    add(f"Characters      {totals['chars']:,}" + (f" ({totals['replacements']:,} undecodable bytes replaced)"
                                                   if totals["replacements"] else ""))
    add(f"Documents       {totals['documents']:,}")
    add(f"Tokens          {totals['tokens']:,} ({totals['chars'] / max(1, totals['tokens']):.2f} characters/token)")
    add(f"Train / val     {totals['train_tokens']:,} / {totals['val_tokens']:,} tokens")
    add(f"Sequences       {sequences(totals['train_tokens'], seq_len):,} train, "
        f"{sequences(totals['val_tokens'], seq_len):,} validation at seq_len {seq_len}")
    add("")
    add(f"{'type':<14}{'files':>8}{'loaded':>8}{'skipped':>9}{'characters':>15}{'tokens':>14}")
    for name, t in totals["by_type"].items():
        add(f"{name:<14}{t['files']:>8,}{t['loaded']:>8,}{t['skipped']:>9,}{t['chars']:>15,}{t['tokens']:>14,}")
    loaded = sorted((r for r in records if r["status"] == "loaded"), key=lambda r: -r["tokens"])[:top]
    if loaded:
        add("")
        add("Largest files (by tokens)")
        for r in loaded:
            add(f"  {r['tokens']:>12,} tokens  {r['chars']:>13,} chars  {r['path']}")
    notes = [r for r in records if r["status"] == "loaded" and r.get("note") and r["type"] != "pdf"]
    if notes:
        add("")
        add(f"Loaded with a note ({len(notes)})")
        for r in notes[:50]:
            add(f"  {r['path']}: {r['note']}")
        if len(notes) > 50:
            add(f"  ... and {len(notes) - 50} more (see --stats_json)")
    folders = [r for r in records if r["status"] == "skipped" and r["type"] == "directory"]
    if folders:
        names = Counter(r["path"].rstrip("/").rsplit("/", 1)[-1] + "/" for r in folders).most_common()
        add("")
        add(f"Skipped folders ({len(folders)}): " + ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names[:20])
            + (" ..." if len(names) > 20 else ""))
    skipped = [r for r in records if r["status"] == "skipped" and r["type"] != "directory"]
    if skipped:
        add("")
        add(f"Skipped files ({len(skipped)})")
        for r in skipped:
            add(f"  {r['path']}: {r['reason']}")
    return "\n".join(lines)
