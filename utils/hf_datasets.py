"""HuggingFace datasets as a corpus: a save_to_disk folder, local json/jsonl/csv/parquet/text files, or a hub
name (from the local cache, or the hub when reachable). Each row's text field is one document."""
from pathlib import Path
from typing import Iterator

from utils.errors import DataError

# Local data files -> the `datasets` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
ROW_BATCH = 1000


def data_files(spec: str) -> list[Path] | None:
    """The local files behind `spec` when it is a file or a folder of data files (not a save_to_disk folder);
    None for a save_to_disk folder or a hub name."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir() and not any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json",
                                                                 "state.json")):
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    return None


def load(spec: str, text_field: str = "text"):
    """Loads a dataset and picks its split: "train" if there is one, else the first.

    Returns:
        (datasets.Dataset, description of what was loaded)
    Raises:
        DataError: nothing loadable under that name, or no string column `text_field`.
    """
    import datasets

    path = Path(spec).expanduser()
    files = data_files(spec)
    try:
        if files is not None:
            if not files:
                raise DataError(f"--hf_dataset {spec!r}: no data files ({', '.join(sorted(BUILDERS))}) in it")
            builders = {BUILDERS.get(p.suffix.lower()) for p in files}
            if None in builders or len(builders) != 1:
                raise DataError(f"--hf_dataset {spec!r}: files must all be one of the kinds "
                                f"{', '.join(sorted(BUILDERS))}; found {sorted({p.suffix for p in files})}")
            ds = datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files])
        elif path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(spec)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise DataError(f"--hf_dataset {spec!r} could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}). Pass a save_to_disk folder, a local "
                        "json/jsonl/csv/parquet/txt file or folder, or a hub name that is cached or reachable.") from e
    split = None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    columns = {name: str(feature) for name, feature in ds.features.items()}
    if text_field not in columns:
        strings = [n for n, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        raise DataError(f"--text_field {text_field!r} is not a column of {spec!r}; its columns are "
                        f"{sorted(columns)} (text columns: {strings or 'none'})")
    return ds, f"{len(ds)} rows" + (f", split {split!r}" if split else "") + f", field {text_field!r}"


def iter_texts(ds, text_field: str, counters: dict) -> Iterator[str]:
    """The non-empty string values of `text_field`, row by row (Arrow is memory-mapped: bounded memory).
    counters["empty_rows"] counts rows skipped for being empty, missing or not a string."""
    for batch in ds.iter(batch_size=ROW_BATCH):
        for text in batch[text_field]:
            if isinstance(text, str) and text.strip():
                yield text
            else:
                counters["empty_rows"] = counters.get("empty_rows", 0) + 1
