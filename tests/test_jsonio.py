"""jsonio.py: JSON and JSONL reading, and atomic writes that leave the old file or the new one, never half of one."""

import json

import pytest

from alpaca_trainml import jsonio


def test_jload_reads_json_and_jsonl_and_open_files(tmp_path):
    (tmp_path / "a.json").write_text('[{"x": 1}]')
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')  # a blank line is skipped
    assert jsonio.jload(tmp_path / "a.json") == [{"x": 1}]
    assert jsonio.jload(tmp_path / "b.jsonl") == [{"x": 1}, {"x": 2}]
    with open(tmp_path / "a.json") as fh:
        assert jsonio.jload(fh) == [{"x": 1}]


def test_jdump_writes_utf8_and_strings_for_what_json_cannot_hold(tmp_path):
    path = tmp_path / "sub" / "out.json"  # the folder is made
    jsonio.jdump({"text": "café 日本", "path": tmp_path}, path)
    raw = path.read_text(encoding="utf-8")
    assert "café 日本" in raw  # not \u escapes
    assert json.loads(raw) == {"text": "café 日本", "path": str(tmp_path)}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.json"
    jsonio.jdump([1, 2], path)

    def half_then_crash(fh):
        fh.write("[3, ")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        jsonio.atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_write_in_binary_mode(tmp_path):
    jsonio.atomic_write(tmp_path / "b.bin", lambda fh: fh.write(b"\x00\xff"), mode="wb")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_and_folders_get_the_mode_the_umask_gives_open_and_mkdir(tmp_path, mask):
    from helpers import umask

    with umask(mask):
        assert jsonio.current_umask() == mask
        jsonio.jdump([1], tmp_path / "a.json")
        jsonio.atomic_write(tmp_path / "b.jsonl", lambda fh: fh.write('{"x": 1}\n'))
        folder = jsonio.make_temp_dir(tmp_path / "model")
    # umask 022: 0644 files and a 0755 folder, readable by another account; 077: private, 0600 and 0700
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o666 & ~mask
    assert folder.parent == tmp_path and folder.name.startswith(".model.")
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask


def test_rewriting_a_file_keeps_its_mode_as_open_would(tmp_path):
    path = tmp_path / "shared.json"
    jsonio.jdump([1], path)
    path.chmod(0o640)
    jsonio.jdump([2], path)
    assert path.stat().st_mode & 0o777 == 0o640 and json.loads(path.read_text()) == [2]
