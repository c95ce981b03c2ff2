"""runtime.files: the shared file helpers (hashing, all-or-nothing writes, leftovers of killed writes)."""

from __future__ import annotations

import hashlib
import json

from molmocap.runtime.files import remove_leftovers, replace_atomically, sha256_file, write_json_atomic


def test_sha256_file_reads_past_one_block(tmp_path):
    data = bytes(range(256)) * 5000  # over the 1 MiB read size
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_write_json_atomic_replaces_whole_with_mode_0644_and_no_temporary_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("old")
    path.chmod(0o600)
    write_json_atomic(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("\n")
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_remove_leftovers_deletes_only_the_temporary_files_of_the_paths_given(tmp_path):
    replace_atomically(tmp_path / "a.xmp", b"<a/>")
    leftovers = [".a.xmp.x1y2z3_4.tmp", ".b.xmp.abcdefgh.tmp"]
    kept = [".c.xmp.abcdefgh.tmp", ".a.xmp.two.parts.tmp", "a.xmp", ".a.xmp.tmp", "notes.tmp", ".hidden"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    remove_leftovers([tmp_path / "a.xmp", tmp_path / "b.xmp", tmp_path / "missing" / "d.xmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
