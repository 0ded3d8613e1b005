"""Prepared data: a dataset written once at the training resolution as a litdata optimized
dataset (`litdata.optimize`), then streamed by `litdata.StreamingDataset` from a local folder,
a shared filesystem or object storage (s3://, gs://: litdata's own clients and credentials).

Why: on a cluster every rank would otherwise decode and resize the publisher's files again
(JPEGs, DICOM exports) at every epoch; prepared chunks are read as they are, sharded across
ranks by litdata, and the loader's position is saved in each checkpoint, so a run killed
mid-epoch resumes on the next sample it had not seen (`StreamingDataLoader` state).

Layout of a prepared folder OUT (`python -m patronus prepare ... --out OUT`):

    OUT/<split>/index.json, chunk-*.bin   one litdata dataset per split, one item per row
    OUT/<split>.tables.safetensors       the split's label tables (labels, attributes): shortcut
                                         builders and analyses select rows without reading images
    OUT/patronus.json                    what was prepared from what, at which size; written last,
                                         so its presence means the preparation finished

An item is stored as {"index": row, "image": uint8 (C, H, W), "label": int, "attributes":
float32 (A,), <mask>: uint8 (1, H, W)} and read back as the batch dict every dataset yields
({"image": [-1, 1] float, "label", "attributes", masks as float}) plus "index", the row in the
prepared split (which sample a batch holds: resume and sharding can be checked).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from patronus.data.datasets import LabelledImageDataset, SubsetDataset
from patronus.torch_utils import to_uint8

FORMAT = "patronus-prepared/1"
META_FILE = "patronus.json"
TABLES_SUFFIX = ".tables.safetensors"
BASE_KEYS = ("image", "label", "attributes")
INSTALL_HINT = "prepared (streaming) data needs litdata: pip install 'patronus[stream]' (or pip install litdata)"


def _litdata() -> Any:
    """litdata, imported only when prepared data is used (it is an optional extra)."""
    try:
        import litdata
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(INSTALL_HINT) from e
    return litdata


def is_uri(root: str) -> bool:
    """s3://, gs://, ... (litdata reads them); anything else is a local or shared-filesystem path."""
    return "://" in str(root)


def join(root: str, name: str) -> str:
    """`root`/`name` for a local path or an object-storage URI (which pathlib would mangle)."""
    return f"{str(root).rstrip('/')}/{name}" if is_uri(root) else str(Path(root) / name)


# --- items: what is stored, and the batch dict it is read back as ---------------------------------


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


class EncodeRow:
    """Row i of a dataset -> the stored item (a picklable callable, for platforms where workers are spawned)."""

    def __init__(self, dataset: LabelledImageDataset, binary_keys: list[str], where: str):
        self.dataset, self.binary_keys, self.where = dataset, list(binary_keys), where

    def __call__(self, i: int) -> dict[str, Any]:
        if not getattr(self, "_one_thread", False):  # as DataLoader workers do: one thread per forked worker
            torch.set_num_threads(1)
            self._one_thread = True
        item = self.dataset[i]
        out: dict[str, Any] = {
            "index": int(i),
            "image": to_uint8(item["image"]),
            "label": int(item["label"]),
            "attributes": torch.as_tensor(item["attributes"], dtype=torch.float32),
        }
        for key, value in item.items():
            if key in BASE_KEYS:
                continue
            if key in self.binary_keys:
                if not is_binary(value):
                    raise ValueError(
                        f"{self.where} row {i}: {key!r} holds values other than 0/1, unlike row 0; a mask must be 0/1 in every row"
                    )
                value = value.to(torch.uint8)
            out[key] = value
        return out


class DecodeItem:
    """Stored item -> the batch dict every dataset yields (+ "index"); picklable for loader workers."""

    def __init__(self, binary_keys: list[str]):
        self.binary_keys = list(binary_keys)

    def __call__(self, stored: dict[str, Any]) -> dict[str, Any]:
        item = dict(stored)
        item["image"] = stored["image"].float() / 127.5 - 1  # the same mapping as datasets.to_model_range
        item["label"] = torch.tensor(int(stored["label"]))
        item["index"] = torch.tensor(int(stored["index"]))
        for key in self.binary_keys:
            item[key] = stored[key].float()
        return item


# --- writing ----------------------------------------------------------------------------------------


def _check_out(out: str, overwrite: bool) -> None:
    if is_uri(out):
        return  # litdata refuses a non-empty remote folder itself; with --overwrite it replaces it (mode="overwrite")
    path = Path(out)
    if path.is_file():
        raise ValueError(f"--out {out}: is a file; expected a folder (new, empty, or --overwrite)")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out}: the folder is not empty; pass --overwrite to replace it, or choose a new folder")
        if not _only_prepared_files(path):
            raise ValueError(f"--out {out}: holds files `prepare` does not write; refusing to delete it even with --overwrite")
        shutil.rmtree(path)


def _only_prepared_files(path: Path) -> bool:
    """Whether `path` holds nothing but what `prepare` writes (also when it was killed half-way)."""
    for entry in path.iterdir():
        if entry.is_file() and not (entry.name == META_FILE or entry.name.endswith(TABLES_SUFFIX) or entry.name.startswith(".tmp-")):
            return False
        if entry.is_dir() and not all(f.is_file() and f.suffix in (".json", ".bin") for f in entry.iterdir()):
            return False  # a litdata split folder holds index.json and chunk-*.bin only
    return True


def _put(local: Path, uri: str, storage_options: Optional[dict[str, Any]]) -> None:
    """Copy a small local file to `uri`: atomically for a path, with litdata's client for object storage."""
    if is_uri(uri):
        from litdata.streaming.fs_provider import _get_fs_provider  # litdata's s3/gs client (same credentials)

        _get_fs_provider(uri, storage_options).upload_file(str(local), uri)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.copyfile(local, tmp)
    os.replace(tmp, target)


def _fetch(uri: str, cache_dir: Optional[str], storage_options: Optional[dict[str, Any]]) -> Path:
    """A local copy of a small file of a prepared dataset (the file itself for a path)."""
    if not is_uri(uri):
        return Path(uri)
    from litdata.streaming.fs_provider import _get_fs_provider

    folder = Path(cache_dir or tempfile.gettempdir()) / "patronus-prepared" / hashlib.md5(uri.encode()).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / uri.rsplit("/", 1)[-1]
    _get_fs_provider(uri, storage_options).download_file(uri, str(local))
    return local


def _isolated_target(run: Callable[[], Any], conn: Any) -> None:
    os.setsid()  # a process group of its own: whatever litdata starts in it can be ended together
    try:
        run()
        conn.send(None)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        # litdata passes a worker's traceback on as text: its first "SomeError: message" line is the cause.
        causes = [line.strip() for line in str(e).splitlines() if re.match(r"\s*[\w.]*(Error|Exception): ", line)]
        conn.send(causes[0] if causes else f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def _isolated(run: Callable[[], Any], where: str) -> None:
    """Run `run` (litdata.optimize) in a forked child with its own process group, and end that group
    afterwards: when a row fails, litdata stops its workers but leaves their helper processes behind."""
    if not hasattr(os, "fork"):  # pragma: no cover - Windows: run in place
        run()
        return
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_target, args=(run, send), daemon=False)
    proc.start()
    send.close()
    try:
        try:
            error = receive.recv()
        except EOFError:
            error = "the preparing process ended without a result (killed? out of memory?)"
        proc.join()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.join()
    if error:
        raise ValueError(f"{where}: preparing failed: {error}")


def write_split(
    dataset: LabelledImageDataset,
    out: str,
    split: str,
    *,
    chunk_bytes: str = "64MB",
    num_workers: Optional[int] = None,
    storage_options: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write one split as a litdata optimized dataset OUT/<split> and its label tables; returns its metadata."""
    litdata = _litdata()
    where = f"{split!r} split"
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{where}: no images to prepare (the dataset has no rows in it); choose others with --splits")
    first = dataset[0]
    missing = [k for k in BASE_KEYS if k not in first]
    if missing:
        raise ValueError(f"{where}: items lack {missing}; expected the batch dict {list(BASE_KEYS)} every dataset yields")
    image = first["image"]
    if image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"{where}: item 0's image is {tuple(image.shape)} {image.dtype}; expected float (C, H, W) in [-1, 1]")
    binary = [k for k, v in first.items() if k not in BASE_KEYS and torch.is_tensor(v) and v.is_floating_point() and is_binary(v)]
    # Forked workers share the dataset as it is (spawned ones re-import torch and unpickle it: ~10 s each).
    _isolated(
        lambda: litdata.optimize(
            fn=EncodeRow(dataset, binary, where),
            inputs=list(range(n)),
            output_dir=join(out, split),
            chunk_bytes=chunk_bytes,
            num_workers=num_workers or min(os.cpu_count() or 1, 8),
            keep_data_ordered=True,
            verbose=False,
            storage_options=storage_options or {},
            start_method="fork" if hasattr(os, "fork") else None,
            mode="overwrite" if overwrite and is_uri(out) else None,
        ),
        where,
    )
    if not is_uri(out):  # litdata can end without error yet short of rows (a worker that died): count them
        index = Path(join(out, split)) / "index.json"
        written = sum(c["chunk_size"] for c in json.loads(index.read_text())["chunks"]) if index.is_file() else 0
        if written != n:
            raise ValueError(f"{index}: {written} rows written, expected {n}; prepare again with --overwrite")
    with tempfile.TemporaryDirectory() as tmp:
        tables = Path(tmp) / f"{split}{TABLES_SUFFIX}"
        save_file(
            {"labels": dataset.labels[:n].long().contiguous(), "attributes": dataset.attributes[:n].float().contiguous()}, str(tables)
        )
        _put(tables, join(out, tables.name), storage_options)
    return {
        "rows": n,
        "channels": int(image.shape[0]),
        "image_size": int(image.shape[-1]),
        "keys": sorted(first),
        "binary_keys": binary,
        "attribute_names": list(dataset.attribute_names),
        "classes": list(dataset.classes),
    }


def prepare(
    splits: dict[str, LabelledImageDataset],
    out: str,
    source: dict[str, Any],
    *,
    chunk_bytes: str = "64MB",
    num_workers: Optional[int] = None,
    overwrite: bool = False,
    storage_options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write every split of `splits` under `out`, then OUT/patronus.json (last: a finished preparation)."""
    if not splits:
        raise ValueError("splits: expected at least one split to prepare")
    _check_out(out, overwrite)
    written = {
        name: write_split(
            ds, out, name, chunk_bytes=chunk_bytes, num_workers=num_workers, storage_options=storage_options, overwrite=overwrite
        )
        for name, ds in splits.items()
    }
    sizes = {(m["channels"], m["image_size"]) for m in written.values()}
    if len(sizes) != 1:
        raise ValueError(f"splits have different image shapes {sorted(sizes)}; expected one training resolution")
    ((channels, size),) = sizes
    meta = {"format": FORMAT, "image_size": size, "channels": channels, "source": source, "splits": written}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / META_FILE
        local.write_text(json.dumps(meta, indent=1))
        _put(local, join(out, META_FILE), storage_options)
    return meta


# --- reading ----------------------------------------------------------------------------------------


def read_metadata(root: str, cache_dir: Optional[str] = None, storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """OUT/patronus.json, checked; errors name the file and what was expected."""
    uri = join(root, META_FILE)
    if not is_uri(root) and not Path(root).is_dir():
        raise FileNotFoundError(f"data.root={root}: no such folder; expected a folder written by `python -m patronus prepare`")
    try:
        text = _fetch(uri, cache_dir, storage_options).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{uri}: missing; data.root must be a folder written by `python -m patronus prepare` "
            "(a preparation that was interrupted has none: run it again with --overwrite)"
        ) from None
    except Exception as e:  # object storage: no such key or bucket, credentials, network (boto3 / google's errors)
        if not is_uri(root):
            raise
        raise FileNotFoundError(
            f"{uri}: cannot read it ({type(e).__name__}: {e}); check the URI, the credentials "
            "litdata uses (AWS_* variables, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS) and "
            "data.options.storage_options"
        ) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{uri}: format {meta.get('format') if isinstance(meta, dict) else None!r}; expected {FORMAT!r} "
            "(written by `python -m patronus prepare`)"
        )
    for key in ("image_size", "channels", "splits"):
        if key not in meta:
            raise ValueError(f"{uri}: no {key!r} field; prepare the data again")
    return meta


class StreamingImageDataset(LabelledImageDataset):
    """One split of a prepared dataset, by row (map-style, for analyses, validation and shortcut
    builders); `training_stream` gives the sharded, shuffled, resumable stream for training.

    The label tables are in memory (from OUT/<split>.tables.safetensors); images are read from the
    chunks on demand. The litdata reader is opened lazily in each process (and never pickled), so
    DataLoader workers open their own.
    """

    def __init__(
        self, root: str, split: str, meta: dict[str, Any], cache_dir: Optional[str] = None, storage_options: Optional[dict[str, Any]] = None
    ):
        self.root, self.split, self.meta = str(root), split, meta
        self.cache_dir, self.storage_options = cache_dir, storage_options
        info = meta["splits"][split]
        self.binary_keys = list(info.get("binary_keys", []))
        uri = join(root, f"{split}{TABLES_SUFFIX}")
        try:
            tables = load_file(str(_fetch(uri, cache_dir, storage_options)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: missing; prepare the data again") from None
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"{uri}: not a readable safetensors file ({e}); prepare the data again") from None
        if "labels" not in tables or "attributes" not in tables or len(tables["labels"]) != info["rows"]:
            raise ValueError(f"{uri}: expected 'labels' and 'attributes' for {info['rows']} rows (see {META_FILE}); prepare the data again")
        self.labels, self.attributes = tables["labels"], tables["attributes"]
        self.attribute_names, self.classes = list(info["attribute_names"]), list(info["classes"])
        self._reader: Any = None
        self._reader_pid: Optional[int] = None

    @property
    def input_dir(self) -> str:
        return join(self.root, self.split)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_reader_pid": None}

    def _stream(self, **kwargs: Any) -> Any:
        litdata = _litdata()
        return litdata.StreamingDataset(self.input_dir, cache_dir=self.cache_dir, storage_options=self.storage_options, **kwargs)

    def reader(self) -> Any:
        """The litdata dataset this process reads rows from (opened on first use, again after a fork)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid = self._stream(), os.getpid()
            items = sum(end - start for start, end in self._reader.region_of_interest)  # all ranks' (len() is one rank's)
            if items != len(self.labels):
                raise ValueError(f"{self.input_dir}: {items} items, but {META_FILE} says {len(self.labels)} rows; prepare the data again")
        return self._reader

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"row {i} of the prepared {self.split!r} split (it has {len(self)} rows)")
        return DecodeItem(self.binary_keys)(self.reader()[int(i)])

    def load_image(self, i: int) -> torch.Tensor:
        return self[i]["image"]

    def training_stream(self, rows: Optional[torch.Tensor] = None, seed: int = 0) -> Any:
        """A shuffled `litdata.StreamingDataset` over `rows` (default: all), sharded across ranks.

        The same `seed` on every rank: litdata derives one permutation from it and gives each rank
        a disjoint part (drop_last: every rank gets as many samples, so collectives stay in step)."""
        stream = self._stream(shuffle=True, drop_last=True, seed=seed, transform=DecodeItem(self.binary_keys))
        if rows is not None and not (len(rows) == len(self) and torch.equal(rows, torch.arange(len(self)))):
            stream = stream.subset(rows.tolist())  # a prefix (train_subset) or a holdout's rows
        return stream


def streaming(
    root: str,
    split: str,
    image_size: int,
    download: bool = False,
    channels: Optional[int] = None,
    cache_dir: Optional[str] = None,
    storage_options: Optional[dict[str, Any]] = None,
    **source_options: Any,
) -> StreamingImageDataset:
    """Registry builder of `data.dataset: streaming`: split `split` of the data `python -m patronus
    prepare` wrote to `root` (a folder, or s3:// / gs:// read by litdata). cache_dir: where chunks of
    remote data are kept (default litdata's ~/.lightning/chunks; use node-local scratch on a cluster).
    storage_options: litdata's options for object storage (endpoint, credentials).
    source_options: the original dataset's options (a preset's data.options, e.g. CelebA's crop), so a
    preset trains on its prepared data with two flags; accepted when the data was prepared with them."""
    if download:
        raise ValueError("data.dataset='streaming' cannot be downloaded; prepare it once with `python -m patronus prepare`")
    meta = read_metadata(root, cache_dir, storage_options)
    where = join(root, META_FILE)
    if split not in meta["splits"]:
        raise ValueError(
            f"{where}: no split {split!r}; the prepared splits are {sorted(meta['splits'])} "
            "(set data.train_split / data.val_split, or prepare that split too)"
        )
    if meta["image_size"] != image_size:
        raise ValueError(
            f"{where}: prepared at {meta['image_size']} px, but the model reads {image_size} px "
            f"(model.net.image_size); prepare again with --data.image_size {image_size}, or set "
            f"model.net.image_size={meta['image_size']}"
        )
    if channels is not None and meta["channels"] != channels:
        raise ValueError(
            f"{where}: prepared with {meta['channels']} channels, but the model reads {channels} "
            f"(model.net.in_channels); prepare again with --data.channels {channels}, or set "
            f"model.net.in_channels={meta['channels']}"
        )
    prepared = (meta.get("source") or {}).get("options") or {}
    differ = {k: v for k, v in source_options.items() if k not in prepared or not same_setting(prepared[k], v)}
    if differ:
        raise ValueError(
            f"{where}: data.options {differ} differ from the options the data was prepared with "
            f"({prepared or 'none'}); prepared images cannot change: prepare again with them, or leave them out"
        )
    return StreamingImageDataset(root, split, meta, cache_dir, storage_options)


def same_setting(a: Any, b: Any) -> bool:
    """Config values compared as the command line gives them (`target: "7"` may come back as 7)."""

    def canon(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): canon(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [canon(v) for v in x]
        return None if x is None else str(x)

    return canon(a) == canon(b)


def shortcut_error(ds: LabelledImageDataset, shortcut: dict[str, Any]) -> str:
    """Why data.shortcut cannot be applied to prepared data, and what to do instead."""
    meta = getattr(ds, "meta", None) or getattr(getattr(ds, "base", None), "meta", None) or {}
    baked = (meta.get("source") or {}).get("shortcut")
    if same_setting(baked, shortcut):
        return (
            "data.shortcut: the prepared data was made with this shortcut and its images carry it already; "
            "drop it with --data.shortcut null (analyses then read the marker, its masks and attribute as stored)"
        )
    return (
        f"data.shortcut with data.dataset='streaming': prepared images are read as stored (prepared with "
        f"{'shortcut ' + json.dumps(baked) if baked else 'no shortcut'}); prepare again with --data.shortcut to bake it in"
    )


def streaming_rows(ds: LabelledImageDataset) -> Optional[tuple[StreamingImageDataset, Optional[torch.Tensor]]]:
    """(prepared split, rows) when `ds` is prepared data, possibly a row selection of it; else None."""
    if isinstance(ds, StreamingImageDataset):
        return ds, None
    if isinstance(ds, SubsetDataset) and isinstance(ds.base, StreamingImageDataset):
        return ds.base, ds.indices
    return None


def resumable_loader(ds: LabelledImageDataset, batch_size: int, num_workers: int, seed: int = 0) -> Optional[DataLoader]:
    """The training loader of prepared data (None for any other data): litdata's StreamingDataLoader.

    Lightning saves its `state_dict` (the samples handed out so far) in every checkpoint and loads it
    on resume, so the epoch continues with the next unseen sample. (Lightning does not fetch ahead
    from a loader with a length, so the saved position is the batches trained on.)"""
    found = streaming_rows(ds)
    if found is None:
        return None
    split, rows = found
    return _litdata().StreamingDataLoader(
        split.training_stream(rows, seed),
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=num_workers > 0,
    )
