"""Exactly-once bookkeeping of generate: the ledger of written samples and the output states."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.errors import RunDirError
from raydistill.outputs import resumable_output
from raydistill.teacher.ledger import finished_samples
from raydistill.teacher.requests import is_done, sample_hash, sample_key


def test_ledger_reads_whole_files_and_deletes_torn_ones(tmp_path):
    pq.write_table(pa.table({"id": ["a", "a", "b"], "sample_index": [0, 1, 0]}), tmp_path / "one.parquet")
    good = tmp_path / "two.parquet"
    pq.write_table(pa.table({"id": ["c"], "sample_index": [0]}), good)
    torn = tmp_path / "three.parquet"
    torn.write_bytes(good.read_bytes()[:-12])  # footer cut off, as by a SIGKILL mid-write
    done, n_torn = finished_samples(tmp_path)
    assert n_torn == 1 and not torn.exists()
    assert list(done) == sorted(sample_hash(sample_key(i, k)) for i, k in [("a", 0), ("a", 1), ("b", 0), ("c", 0)])
    assert is_done(sample_key("a", 1), done) and not is_done(sample_key("b", 1), done)
    assert not is_done(sample_key("zz", 0), done) and not is_done("a", np.array([], dtype=np.uint64))


def test_resumable_output_states(tmp_path):
    final = tmp_path / "samples"
    out = resumable_output(final, overwrite=False, resume=False, what="samples")
    assert out is not None and not out.resumed
    (out.start() / "part.parquet").write_text("x")
    # an interrupted run is neither silently reused nor clobbered
    with pytest.raises(RunDirError, match="interrupted run.*--resume.*--overwrite"):
        resumable_output(final, overwrite=False, resume=False, what="samples")
    again = resumable_output(final, overwrite=False, resume=True, what="samples")
    assert again.resumed and (again.partial / "part.parquet").exists()
    (again.partial / "_manifest.json").write_text("{}")
    again.commit()
    assert (final / "part.parquet").exists() and not again.partial.exists()
    assert resumable_output(final, overwrite=False, resume=True, what="samples") is None  # complete: nothing to do
    with pytest.raises(RunDirError, match="already exists"):
        resumable_output(final, overwrite=False, resume=False, what="samples")
    fresh = resumable_output(final, overwrite=True, resume=False, what="samples")
    fresh.start()
    fresh.discard()  # a failed fresh run leaves the old artifact as it was
    assert not fresh.partial.exists() and (final / "part.parquet").exists()
