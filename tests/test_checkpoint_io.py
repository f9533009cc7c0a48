"""Tests of checkpoint_io.py: row chunks, shards, reading checkpoints."""

import pytest

from alpaca_trainml.checkpoints import checkpoint_io


def test_row_chunks_and_shards_cover_everything():
    chunks = checkpoint_io.row_chunks((10, 3), chunk_bytes=4 * 3 * 4)  # 4 rows of 3 fp32 per chunk
    assert chunks == [(0, 4), (4, 8), (8, 10)]
    assert checkpoint_io.row_chunks((10, 3), None) == [(0, 10)]
    assert checkpoint_io.row_chunks((), 100) == [(None, None)]
    shards = checkpoint_io.plan_shards({"a": (10,), "b": (10,), "c": (30,)}, max_shard_bytes=80)
    assert shards == [["a", "b"], ["c"]]  # a+b = 80 bytes fit; c (120 bytes) goes alone


def test_a_missing_or_file_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope'}: no such folder"):
        checkpoint_io.Checkpoint(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="f.txt: not a folder"):
        checkpoint_io.Checkpoint(tmp_path / "f.txt")
