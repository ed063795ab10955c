"""The Ray fan-out: one task per shard, the manifest updated as shards complete.

Samples of a split are sorted by key and cut into shards of ``shard_size``, so a shard's
content depends only on the source and the options: a rerun skips every shard the manifest
lists whose file still has its sha256, and a run killed midway and restarted writes exactly the
shards an uninterrupted run writes. A task that dies is retried by Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Any

import ray
from tqdm.auto import tqdm

from .shards import FORMAT_VERSION, read_manifest, resolve, sha256_of, write_manifest, write_shard
from .sources import SampleError, SampleRef
from .sources.base import UnreachableError, encode_png


class TooManyRejected(RuntimeError):
    """More samples were rejected than the run allows."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a preparation writes: per split, the refs of each shard."""

    shards: dict[str, list[list[SampleRef]]]

    def fingerprint(self, source_desc: dict) -> str:
        listing = {split: [[r.key for r in chunk] for chunk in chunks] for split, chunks in self.shards.items()}
        blob = json.dumps({"source": source_desc, "listing": listing}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def make_plan(source, splits: list[str], shard_size: int) -> Plan:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards = {}
    for split in splits:
        refs = sorted(source.list(split), key=lambda r: r.key)
        shards[split] = [refs[i:i + shard_size] for i in range(0, len(refs), shard_size)]
    return Plan(shards)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def build_rows(source, refs: list[SampleRef]) -> tuple[list[dict], list[dict]]:
    """(rows of the good samples, {key, reason} of the rejected ones)."""
    rows, rejected = [], []
    for ref in refs:
        try:
            s = source.load(ref)
            rows.append({"key": s.key, "image": s.image, "image_format": s.image_format,
                         "label": encode_png(s.label), "height": s.height, "width": s.width})
        except SampleError as exc:
            rejected.append({"key": ref.key, "reason": str(exc)})
    return rows, rejected


def check_root_here(source, name: str) -> None:
    """The dataset's root must be readable where the task runs: a root that only another node's
    disk holds would turn every sample of the shard into a rejection, so it stops the run."""
    root = getattr(source, "root", None)
    if root is not None and not root.is_dir():
        node = ray.util.get_node_ip_address() if ray.is_initialized() else "this machine"
        raise UnreachableError(
            f"the dataset root {root} is not a folder on the node that prepares {name} ({node}): on a "
            "cluster, give data.root (--root) as a URI every node reads (s3://..., gs://..., file:///shared/...)")


@ray.remote(max_retries=3)
def _prepare_shard(source, refs: list[SampleRef], out: str, name: str) -> dict:
    check_root_here(source, name)
    rows, rejected = build_rows(source, refs)
    fs, base = resolve(out)
    record = write_shard(fs, base, name, rows)
    return {**record, "rejected": [{**r, "shard": name} for r in rejected]}


def _new_manifest(source, source_desc: dict, plan: Plan, shard_size: int) -> dict:
    info = source.info
    return {
        "format": FORMAT_VERSION, "dataset": info.name, "classes": list(info.classes),
        "palette": [list(c) for c in info.palette], "ignore_index": info.ignore_index,
        "source": source_desc, "shard_size": shard_size, "fingerprint": plan.fingerprint(source_desc),
        "complete": False,
        "splits": {split: {"samples": 0, "shards": [], "rejected": []} for split in plan.shards},
    }


def _done_shards(existing: dict | None, fingerprint: str, out: str) -> dict[str, dict]:
    """file -> record of the shards a previous run completed and that are intact."""
    if existing is None:
        return {}
    if existing.get("fingerprint") != fingerprint:
        raise ValueError(f"{out} holds a different preparation (other source, options or samples); "
                         "choose another --out or delete it")
    fs, base = resolve(out)
    done = {}
    for split in existing["splits"].values():
        for rec in split["shards"]:
            path = f"{base}/{rec['file']}"
            if fs.get_file_info(path).size is not None and sha256_of(fs, path) == rec["sha256"]:
                rejected = [r for r in split["rejected"] if r["shard"] == rec["file"]]
                done[rec["file"]] = {**rec, "rejected": rejected}
    return done


def _summarise(manifest: dict) -> int:
    """Prints each split's counts and rejected samples; returns how many were rejected."""
    file, total_rej = sys.stdout, 0
    for split, entry in manifest["splits"].items():
        rej = entry["rejected"]
        total_rej += len(rej)
        print(f"{split}: {entry['samples']} samples in {len(entry['shards'])} shards, {len(rej)} rejected", file=file)
        for r in rej[:20]:
            print(f"  rejected {r['key']}: {r['reason']}", file=file)
        if len(rej) > 20:
            print(f"  ... and {len(rej) - 20} more (all listed in manifest.json)", file=file)
    return total_rej


def prepare(source, out: str, *, source_desc: dict[str, Any], splits: list[str] | None = None,
            shard_size: int = 64, max_rejected: float | None = None, progress: bool = True,
            summary: bool = True) -> dict:
    """Prepare the splits of source into Parquet shards under out; returns the manifest.

    Args:
        source: a source (``data_prep.sources.build_source``).
        out: output directory: a local path or a ``pyarrow.fs`` URI.
        source_desc: how the source was built (recorded in the manifest and fingerprinted).
        splits: the splits to prepare (default: all of the source's).
        shard_size: samples per shard.
        max_rejected: fail (after writing everything) when more than this fraction of a run's
            samples is rejected.
        progress: show a progress bar.
        summary: print the per-split counts and the rejected samples.
    """
    splits = list(splits or source.splits)
    plan = make_plan(source, splits, shard_size)
    manifest = _new_manifest(source, source_desc, plan, shard_size)
    fs, base = resolve(out)
    fs.create_dir(base, recursive=True)
    done = _done_shards(read_manifest(out), manifest["fingerprint"], out)
    records: dict[str, dict] = dict(done)

    def flush(complete: bool) -> None:
        for split, chunks in plan.shards.items():
            recs = [records[shard_name(split, i)] for i in range(len(chunks)) if shard_name(split, i) in records]
            entry = manifest["splits"][split]
            entry["shards"] = [{k: r[k] for k in ("file", "rows", "sha256")} for r in recs]
            entry["rejected"] = [x for r in recs for x in r["rejected"]]
            entry["samples"] = sum(r["rows"] for r in recs)
        manifest["complete"] = complete
        write_manifest(out, manifest)

    source_ref = ray.put(source)
    pending = {}
    for split, chunks in plan.shards.items():
        for i, refs in enumerate(chunks):
            name = shard_name(split, i)
            if name not in records:
                pending[_prepare_shard.remote(source_ref, refs, out, name)] = name
    total = sum(len(c) for chunks in plan.shards.values() for c in chunks)
    skipped = sum(len(c) for split, chunks in plan.shards.items() for i, c in enumerate(chunks)
                  if shard_name(split, i) in records)
    with tqdm(total=total, initial=skipped, unit="img", desc=f"prepare {source.info.name}",
              disable=not progress, file=sys.stdout) as bar:
        flush(complete=False)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            records[name] = ray.get(ready[0])
            bar.update(records[name]["rows"] + len(records[name]["rejected"]))
            flush(complete=False)
    flush(complete=True)
    rejected = _summarise(manifest) if summary else sum(len(e["rejected"]) for e in manifest["splits"].values())
    if max_rejected is not None and total and rejected / total > max_rejected:
        raise TooManyRejected(f"{rejected} of {total} samples rejected ({rejected / total:.1%}), above "
                              f"--max-rejected {max_rejected:.1%}; reasons are in {base}/manifest.json")
    return manifest
