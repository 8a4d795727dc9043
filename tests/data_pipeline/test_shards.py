import io
import tarfile

import numpy as np
import pytest

from data_pipeline.shards import ShardFormatError, ShardReader, _npy, encode_sample, write_shard


def sample(i):
    return encode_sample(f"{i:010d}", "contrastive", {
        "query_ids": np.arange(i + 3, dtype=np.int32), "doc_ids": np.arange(7, dtype=np.int32),
        "doc_offsets": np.array([0, 3, 7]), "doc_hash": np.array([1, 2**63 + 5], dtype=np.uint64)},
        {"source": "s", "origin": {"file": "f", "line": i}, "n_docs": 2, "n_pos": 1})


def test_tar_bytes_equal_pythons_tarfile(tmp_path):
    members = [m for i in range(5) for m in sample(i)]
    ours = tmp_path / "ours.tar"
    write_shard(ours, members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                0,
                0o644,
                0,
                0,
                "",
                "",
            )
            tar.addfile(info, io.BytesIO(data))
    assert ours.read_bytes() == buf.getvalue()


def test_npy_matches_numpy_save():
    for a in [np.arange(5, dtype=np.int32), np.zeros(0, np.int64), np.array([2**64 - 1], np.uint64)]:
        b = io.BytesIO()
        np.save(b, a, allow_pickle=False)
        assert _npy(a) == b.getvalue() == _npy(a)


def test_reader_round_trip_and_checks(tmp_path):
    p = tmp_path / "s.tar"
    write_shard(p, [m for i in range(3) for m in sample(i)])
    r = ShardReader(p, "contrastive")
    s = r.read(2)
    assert len(r) == 3 and s["__key__"] == "0000000002" and s["query_ids"].tolist() == [0, 1, 2, 3, 4]
    assert s["doc_hash"].dtype == np.uint64 and s["doc_hash"][1] == 2**63 + 5 and s["meta"]["origin"]["line"] == 2
    with pytest.raises(ShardFormatError, match="must not contain"):
        encode_sample("a.b", "contrastive", {}, {})
    with pytest.raises(ShardFormatError, match="needs fields"):
        encode_sample("k", "listwise", {"query_ids": np.zeros(1)}, {})
