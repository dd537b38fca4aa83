"""The on-disk layout of an attribution run, and reading it back as a stream.

``OUTPUT_DIR/shards/rankR-RUN-NNNNN.safetensors`` each hold up to
``export.samples_per_shard`` samples of one rank; ``OUTPUT_DIR/index-rankR.jsonl``
lists one sample per line (id first, then text, tokens, shard, row, ...). A shard
is renamed into place before its lines are appended in one fsynced write, so an
indexed sample always has its maps; a run killed halfway loses at most the samples
of its open shards (never indexed, so the rerun redoes them) and leaves at most a
partial last index line (ignored, and cut off by the next run of that rank).
"""

from .files import (
    FAILURES_FILE, FAILURES_PATTERN, INDEX_PATTERN, LOCK_FILE, OVERLAY_DIR, SHARD_DIR, append_lines, atomic_write,
    cut_partial_line, failures_path, fsync_dir, index_path, last_line, pending_path, pending_ranks, safe_name,
    settle_pending,
)
from .files import IDENTITY_FILE
from .identity import LAYOUT_VERSION, OutputInUse, OutputMismatch, OutputRefused, claim_identity, run_identity
from .lock import RunLock
from .readers import (
    AttributionRecord, EvaluationRecord, indexed_samples, count_done, done_ids, index_entries, merged_failures,
    read_attributions, read_evaluation, shard_names, to_original_size,
)

__all__ = [
    "AttributionRecord", "EvaluationRecord", "FAILURES_FILE", "FAILURES_PATTERN", "IDENTITY_FILE", "INDEX_PATTERN",
    "LAYOUT_VERSION", "LOCK_FILE", "OVERLAY_DIR", "OutputInUse", "OutputMismatch", "OutputRefused", "RunLock", "SHARD_DIR",
    "append_lines", "atomic_write", "claim_identity", "count_done", "cut_partial_line", "done_ids", "failures_path", "indexed_samples",
    "fsync_dir", "index_entries", "index_path", "last_line", "merged_failures", "pending_path", "pending_ranks",
    "read_attributions", "read_evaluation", "run_identity", "safe_name", "settle_pending", "shard_names",
    "to_original_size",
]
