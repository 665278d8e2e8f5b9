"""Run storage (raydistill.storage) on a local folder and on an S3 server (moto, on loopback):
the same calls, the same commit rule, errors that name the path and the fix."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.errors import RunDirError
from raydistill.models import node_local
from raydistill.outputs import resumable_output, staged_output
from raydistill.progress import ParquetRows
from raydistill.schema import parquet_files
from raydistill.storage import Location, commit


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 and the environment every process would be given."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with mock.patch.dict(os.environ, env):
        import pyarrow.fs as pafs

        # pyarrow's from_uri reads AWS_ENDPOINT_URL; the constructor needs it spelled out
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("bucket")
        yield env
    server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location(tmp_path / "run")
    request.getfixturevalue("s3_env")
    return Location(f"s3://bucket/{request.node.name.replace('[', '-').rstrip(']')}")


def test_small_files_listing_and_delete(root):
    assert not root.exists() and root.list() == []
    (root / "a" / "x.json").write_json({"k": 1})
    (root / "a" / "_manifest.json").write_text("{}")
    (root / "a" / ".hidden").write_text("h")
    assert (root / "a" / "x.json").read_json() == {"k": 1} and (root / "a").exists()
    assert [os.path.basename(i.path) for i in (root / "a").list()] == ["x.json"]  # metadata and hidden files skipped
    assert len((root / "a").list(hidden=True)) == 3 and (root / "a").complete()
    with pytest.raises(FileNotFoundError):
        (root / "a" / "missing").read_text()
    (root / "a").delete()
    (root / "a").delete()  # gone already: fine
    assert not (root / "a").exists() and not (root / "a" / "x.json").is_file()


def test_commit_makes_the_partial_folder_the_artifact_manifest_last(root):
    partial, final = root / ".samples.partial", root / "samples"
    (final / "old.parquet").write_text("old")
    (final / "_manifest.json").write_text('{"old": true}')
    (partial / "new.parquet").write_text("new")
    (partial / "sub" / "f.txt").write_text("deep")
    (partial / "_manifest.json").write_text('{"new": true}')
    commit(partial, final)
    assert not partial.exists()
    assert sorted(os.path.basename(i.path) for i in final.list(recursive=True, hidden=True)) == ["_manifest.json", "f.txt", "new.parquet"]
    assert (final / "_manifest.json").read_json() == {"new": True} and (final / "sub" / "f.txt").read_text() == "deep"


def test_an_object_store_commit_cut_short_is_committed_again_by_resume(s3_env):
    final = Location("s3://bucket/cut/samples")
    partial = final.sibling(".samples.partial")
    (partial / "a.parquet").write_text("a")
    (partial / "_manifest.json").write_text("{}")
    (final / "a.parquet").write_text("a")  # copied before the crash; the manifest was not
    with pytest.raises(RunDirError, match="already exists"):
        resumable_output(final, overwrite=False, resume=False, what="samples")
    out = resumable_output(final, overwrite=False, resume=True, what="samples")
    assert out is not None and out.resumed
    out.commit()
    assert final.complete() and not partial.exists()
    assert resumable_output(final, overwrite=False, resume=True, what="samples") is None


def test_staged_output_commits_on_success_and_leaves_nothing_on_error(root):
    final = root / "eval"
    with staged_output(final) as staged:
        table = pa.table({"x": [1, 2, 3]})
        (staged.partial / "results").mkdir()
        pq.write_table(table, (staged.partial / "results" / "a.parquet").path, filesystem=staged.partial.fs)
        (staged.local / "report.md").write_text("# report")
        (staged.local / "_manifest.json").write_text("{}")
    assert final.complete() and (final / "report.md").read_text() == "# report"
    assert ParquetRows(final / "results")() == 3 and len(parquet_files(final / "results")) == 1
    with pytest.raises(ValueError), staged_output(final) as staged:
        (staged.local / "report.md").write_text("half")
        raise ValueError("the stage failed")
    assert (final / "report.md").read_text() == "# report"  # the old artifact as it was
    assert [i.path for i in root.list(recursive=True, hidden=True) if ".eval.tmp" in i.path] == []


def test_a_location_pickles_as_its_uri_and_resolves_again(root):
    loc = root / "samples"
    _ = loc.fs
    again = pickle.loads(pickle.dumps(loc))
    assert again == loc and again._fs is None and again.path == loc.path


def test_local_paths_and_file_uris_are_the_same_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location("runs/x").uri == str(tmp_path / "runs" / "x")
    assert Location(f"file://{tmp_path}/runs/x") == Location("runs/x") and not Location("runs/x").remote
    assert Location("s3://b/run/").uri == "s3://b/run" and (Location("s3://b/run") / "samples").uri == "s3://b/run/samples"


def test_a_missing_bucket_is_one_line_naming_the_path_and_the_fix(s3_env):
    with pytest.raises(RunDirError) as err:
        Location("s3://no-such-bucket/run/samples/_manifest.json").write_text("{}")
    message = str(err.value)
    assert "s3://no-such-bucket/run" in message and "bucket exists" in message and "\n" not in message


def test_a_model_in_object_storage_is_fetched_once_per_version(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path / "cache"))
    model = Location("s3://bucket/run/student/merged")
    (model / "config.json").write_text('{"v": 1}')
    first = node_local(model.uri)
    assert first.startswith(str(tmp_path / "cache")) and Path(first, "config.json").read_text() == '{"v": 1}'
    assert node_local(model.uri) == first  # cached
    (model / "config.json").write_text('{"v": 2, "retrained": true}')
    second = node_local(model.uri)
    assert second != first and "retrained" in Path(second, "config.json").read_text()
    assert node_local(str(tmp_path)) == str(tmp_path)  # a local path is used as it is


@pytest.mark.parametrize("problem", ["missing bucket", "unreachable endpoint"])
def test_bad_object_storage_fails_the_cli_in_one_line_before_any_work(problem, s3_env, tmp_path, capsys):
    import yaml

    from raydistill.cli import main

    (tmp_path / "q.jsonl").write_text('{"text": "bonjour"}\n')
    run_dir = "s3://no-such-bucket/run" if problem == "missing bucket" else "s3://bucket/cli-run"
    config = {"run_dir": run_dir, "queries": {"train_path": str(tmp_path / "q.jsonl"), "eval_path": str(tmp_path / "q.jsonl")},
              "teacher": {"model": "org/model"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"} if problem == "unreachable endpoint" else {}  # nothing listens on 9
    with mock.patch.dict(os.environ, env):
        assert main(["generate", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raydistill: error: cannot use run storage 's3://")
    assert "AWS_ENDPOINT_URL" in err[0] and "bucket exists" in err[0]
    if problem == "missing bucket":
        assert in_moto("no-such-bucket") is None
    else:
        assert in_moto("bucket", "cli-run/") == [], "nothing written"


def in_moto(bucket: str, prefix: str = "") -> list[str] | None:
    """The keys under a prefix of a bucket on the moto server (None: no such bucket)."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    try:
        return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    except client.exceptions.NoSuchBucket:
        return None
