"""Checkpoint storage: one directory per checkpoint, committed by a manifest written last.

The parts, leaf first (no module imports one that comes after it):

- :mod:`~framework.checkpoint.storage`        local paths and fsspec URLs, credential redaction
- :mod:`~framework.checkpoint.serialization`  state trees <-> tensors + JSON skeleton (no pickle)
- :mod:`~framework.checkpoint.checksums`      checksums of byte streams (xxh3, crc32 fallback)
- :mod:`~framework.checkpoint.tensor_files`   safetensors files (the library's format, hashed while streamed)
- :mod:`~framework.checkpoint.pt_files`       opt-in torch.save files (read with ``weights_only=True``)
- :mod:`~framework.checkpoint.owner`          which process writes a staging dir, and whether it ended
- :mod:`~framework.checkpoint.format`         the manifest and the errors
- :mod:`~framework.checkpoint.save` / ``load``  writing (staging, atomic commit) and verified reading
- :mod:`~framework.checkpoint.discovery`      listing, ``"last"``, removal, stale staging cleanup
- :mod:`~framework.checkpoint.async_writer`   snapshot overlapping the next step, write in the background
- :mod:`~framework.checkpoint.consolidate`    model weights of any layout as one state dict / file
- :mod:`~framework.checkpoint.trainer_state`  what a Trainer checkpoint holds and putting it back
"""

from framework.checkpoint.async_writer import AsyncCheckpointWriter
from framework.checkpoint.discovery import cleanup_stale, find_last, list_checkpoints, remove_checkpoint
from framework.checkpoint.format import (
    MANIFEST,
    MODEL,
    TRAINER,
    CheckpointDamaged,
    CheckpointError,
    FileEntry,
    Manifest,
    Staging,
    checkpoint_error,
    new_token,
    rank_state_name,
)
from framework.checkpoint.load import read_manifest, read_state, verify_checkpoint
from framework.checkpoint.save import (
    begin_checkpoint,
    commit_checkpoint,
    describe_files,
    exchange_entries,
    save_checkpoint,
    write_file,
    write_state,
)
from framework.checkpoint.storage import locate, redact

__all__ = [
    "CheckpointError", "CheckpointDamaged", "FileEntry", "Manifest", "Staging", "MODEL", "TRAINER", "MANIFEST", "redact",
    "rank_state_name", "new_token", "begin_checkpoint", "write_state", "describe_files",
    "commit_checkpoint", "save_checkpoint", "read_manifest", "read_state", "verify_checkpoint",
    "list_checkpoints", "find_last", "remove_checkpoint", "cleanup_stale", "AsyncCheckpointWriter",
    "exchange_entries", "checkpoint_error", "locate", "write_file",
]
