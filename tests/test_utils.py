"""Atomic writes: a reader sees the old content or the new, and a failed write leaves nothing behind."""
import pytest

from peftlab.utils import atomic_file, atomic_write_text, write_csv


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "cache.pt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            assert tmp.parent == path.parent and tmp.suffix == ".pt"  # savefig / torch.save read the extension
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["cache.pt"]
    with atomic_file(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and len(list(path.parent.iterdir())) == 1


def test_csv_rows_with_missing_values_and_left_out_keys(tmp_path):
    write_csv(tmp_path / "t.csv", [{"a": 1, "b": None, "curve": [1, 2]}, {"a": 2, "b": 0.5}], ["a", "b"])
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1,", "2,0.5"]
