"""A run's results as a Parquet table, for pandas, DuckDB or Hugging Face ``datasets``.

One row per sample, in index order, written shard by shard (nothing holds the whole run):
``id``, ``text``, ``tokens``, the ``answer`` and its ``answer_source`` (VQA runs), ``class``,
``image_fit`` / ``text_fit`` (attribution runs), one ``METHOD/METRIC`` column per method and
metric and ``METHOD/seconds`` (evaluation runs), and ``shard`` / ``row`` (where the maps are).
With ``maps=True`` the maps come along as lists: ``image_map`` (the min-maxed patch grid,
row-major; ``patch_grid`` gives its shape) and ``text_map`` for an attribution run,
``METHOD/image`` and ``METHOD/text`` for an evaluation.

    python -m m2ib_lightning.export OUTPUT_DIR results.parquet [--maps]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator

from .results import indexed_samples, index_entries

SCALARS = {"text": "string", "answer": "string", "answer_source": "string", "class": "string",
           "image_fit": "float64", "text_fit": "float64", "length": "int64"}


def _schema(first: dict[str, Any], maps: bool):
    import pyarrow as pa

    types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64()}
    always = ("text", "answer", "answer_source", "class", "length")  # null where a run or a sample has none
    fields = [pa.field("id", pa.string()), *(pa.field(k, types[t]) for k, t in SCALARS.items() if k in always or k in first),
              pa.field("tokens", pa.list_(pa.string()))]
    for method, metrics in first.get("values", {}).items():
        fields += [pa.field(f"{method}/{metric}", pa.float64()) for metric in metrics]
        fields.append(pa.field(f"{method}/seconds", pa.float64()))
    if maps and "values" in first:
        for method in first["values"]:
            fields += [pa.field(f"{method}/image", pa.list_(pa.float32())), pa.field(f"{method}/text", pa.list_(pa.float32()))]
    elif maps:
        fields += [pa.field("patch_grid", pa.list_(pa.int64())), pa.field("image_map", pa.list_(pa.float32())),
                   pa.field("text_map", pa.list_(pa.float32()))]
    fields += [pa.field("shard", pa.string()), pa.field("row", pa.int64())]
    return pa.schema(fields)


def _row(entry: dict[str, Any], tensors: dict[str, Any], schema: Any, maps: bool) -> dict[str, Any]:
    row = {name: entry.get(name) for name in ("id", "shard", "row", "tokens", *SCALARS) if name in schema.names}
    for method, metrics in entry.get("values", {}).items():
        row.update({f"{method}/{metric}": value for metric, value in metrics.items()})
        row[f"{method}/seconds"] = entry.get("seconds", {}).get(method)
    if maps:
        index, length = entry["row"], entry["length"]
        if "values" in entry:
            for method in entry["values"]:
                row[f"{method}/image"] = tensors[f"{method}/image"][index].flatten().tolist()
                text = tensors.get(f"{method}/text")
                row[f"{method}/text"] = None if text is None else text[index, :length].tolist()
        else:
            rows, cols = entry["patch_grid"]
            row["patch_grid"] = [rows, cols]
            row["image_map"] = tensors["image_map_grid"][index, :rows, :cols].flatten().tolist()
            row["text_map"] = tensors["text_map"][index, :length].tolist()
    return {name: row.get(name) for name in schema.names}


def _by_shard(output_dir: Path) -> Iterator[list[tuple[dict, dict]]]:
    """The samples of one shard at a time (its tensors loaded once)."""
    group: list[tuple[dict, dict]] = []
    for entry, tensors in indexed_samples(output_dir):
        if group and entry["shard"] != group[-1][0]["shard"]:
            yield group
            group = []
        group.append((entry, tensors))
    if group:
        yield group


def to_parquet(output_dir: str | Path, path: str | Path, *, maps: bool = False) -> int:
    """Write a run's index (attribution or evaluation; ``maps``: with its maps) to ``path``; returns the rows written.

    Raises ``ValueError`` naming ``output_dir`` when it holds no indexed sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    output_dir = Path(output_dir)
    first = next(iter(index_entries(output_dir)), None)
    if first is None:
        raise ValueError(f"{output_dir} holds no indexed sample (not a run's output_dir, or nothing done yet)")
    schema = _schema(first, maps)
    written = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        for group in _by_shard(output_dir):
            rows = [_row(entry, tensors, schema, maps) for entry, tensors in group]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            written += len(rows)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run's output_dir (attribution or evaluation)")
    parser.add_argument("path", help="the Parquet file to write")
    parser.add_argument("--maps", action="store_true", help="also write the maps, as lists")
    args = parser.parse_args(argv)
    try:
        rows = to_parquet(args.output_dir, args.path, maps=args.maps)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {rows} rows to {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
