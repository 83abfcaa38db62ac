"""Atomic writes: the whole new file, or the old one and no leftovers."""

import io
import json
import os

import pytest

from hairseg_jax import files


def test_writes_text_bytes_and_json_leaving_no_temporary_file(tmp_path):
    files.write_atomically(tmp_path / "a.txt", "text")
    files.write_atomically(tmp_path / "b.bin", b"\x00\x01")
    files.write_json(tmp_path / "c.json", {"dice": 0.5})
    assert (tmp_path / "a.txt").read_text() == "text"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"dice": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomically(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_of_any_new_file(tmp_path, umask):
    """0666 less the umask, as ``open`` gives (others can read reports and configs)."""
    old = os.umask(umask)
    try:
        files.write_json(tmp_path / "eval_test.json", {"dice": 0.5})
    finally:
        os.umask(old)
    assert (tmp_path / "eval_test.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_names_the_file_not_its_temporary_one(tmp_path, monkeypatch):
    """A full disk's error names no file; a missing folder's names the temporary file."""
    missing = tmp_path / "gone" / "a.json"
    with pytest.raises(FileNotFoundError) as error:
        files.write_atomically(missing, "x")
    assert error.value.filename == str(missing)

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(fd, mode))
    path = tmp_path / "report.json"
    with pytest.raises(OSError) as error:
        files.write_atomically(path, "x" * 100_000)
    assert str(error.value) == f"[Errno 28] No space left on device: '{path}'"
    assert list(tmp_path.iterdir()) == []
