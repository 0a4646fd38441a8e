"""Stores configured the way users already configure them: the AWS
environment and profile files for s3:// (under restore's own options), the
Azure environment for az:// against Azurite. Errors are one line naming the
setting to fix."""

from __future__ import annotations

import re
import socketserver
import threading

import numpy as np
import pytest

from restore.errors import StoreError
from restore.handler import Server
from restore.settings import ServerSettings
from restore.snapshot import Snapshot
from restore.guest import Guest, reads
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore, S3Options, _s3_settings
from restore.tiers.l1 import L1Cache

SIZE = 2 << 20
DEAD = "http://127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No AWS or Azure setting of the host leaks in; the AWS profile files
    are the test's own (absent unless a test writes them)."""
    import os

    for var in list(os.environ):
        if var.startswith(("AWS_", "AZURE_", "AZURITE_", "RESTORE_S3_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))


@pytest.fixture(scope="module")
def image(make_image):
    return make_image(SIZE, seed=5)


KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


def _objects(s3_server, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    return [o["Key"] for o in client.list_objects_v2(Bucket="snapshots", Prefix=prefix).get("Contents", [])]


def _one_line_error(proc) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --- s3:// and the AWS environment, end to end through the CLI -------------


def test_aws_endpoint_url_with_allow_http(s3_server, image, run_cli):
    env = {**KEYS, "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ALLOW_HTTP": "true"}
    url = "s3://snapshots/aws-env"
    out = run_cli("snapshot", "create", str(image), "--name", "fn", "--store", url, env=env, check=True).stdout
    assert out.startswith("created fn/1 in s3://snapshots/aws-env")
    assert run_cli("snapshot", "verify", "fn", "--store", url, env=env, check=True).stdout == \
        "fn/1: all 4 chunks verified\n"
    assert "aws-env/snapshots/fn/1/manifest.json" in _objects(s3_server, "aws-env/")


def test_aws_endpoint_url_alone_allows_its_http(s3_server, image, run_cli):
    """Without AWS_ALLOW_HTTP an http:// endpoint is used, as the AWS CLI uses it."""
    env = {**KEYS, "AWS_ENDPOINT_URL": s3_server.endpoint}
    run_cli("snapshot", "create", str(image), "--name", "fn", "--store", "s3://snapshots/alone", env=env, check=True)
    assert "alone/snapshots/fn/1/manifest.json" in _objects(s3_server, "alone/")


def test_aws_endpoint_url_s3_beats_aws_endpoint_url(s3_server, image, run_cli):
    env = {**KEYS, "AWS_ENDPOINT_URL": DEAD, "AWS_ENDPOINT_URL_S3": s3_server.endpoint, "AWS_ALLOW_HTTP": "1"}
    url = "s3://snapshots/svc"
    run_cli("snapshot", "create", str(image), "--name", "fn", "--store", url, env=env, check=True)
    assert "fn/1" in run_cli("snapshot", "ls", "--store", url, env=env, check=True).stdout


@pytest.mark.parametrize("how", ["option", "env"])
def test_restore_endpoint_beats_the_aws_ones(s3_server, image, run_cli, how):
    env = {**KEYS, "AWS_ENDPOINT_URL": DEAD, "AWS_ENDPOINT_URL_S3": DEAD, "AWS_ALLOW_HTTP": "false"}
    args = ["--store", "s3://snapshots/ours"]
    if how == "option":
        args += ["--s3-endpoint", s3_server.endpoint]
    else:
        env["RESTORE_S3_ENDPOINT"] = s3_server.endpoint
    run_cli("snapshot", "create", str(image), "--name", "fn", *args, env=env, check=True)
    assert "ours/snapshots/fn/1/manifest.json" in _objects(s3_server, "ours/")


def test_aws_profile_files(s3_server, image, run_cli, tmp_path):
    """Endpoint, region and keys from a named profile, nothing in the environment."""
    (tmp_path / "aws-config").write_text(
        "[default]\nregion = eu-west-3\n\n"
        f"[profile moto]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint}\n"
    )
    (tmp_path / "aws-credentials").write_text("[moto]\naws_access_key_id = test\naws_secret_access_key = test\n")
    url = "s3://snapshots/profile"
    run_cli("snapshot", "create", str(image), "--name", "fn", "--store", url, env={"AWS_PROFILE": "moto"},
            check=True)
    assert "profile/snapshots/fn/1/manifest.json" in _objects(s3_server, "profile/")
    # Without AWS_PROFILE the default profile has no endpoint: real AWS, not moto.
    settings, _, where = _s3_settings(S3Options(), {"AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
                                                   "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials")})
    assert where is None and "endpoint" not in settings and settings["region"] == "eu-west-3"


def test_a_missing_profile_is_named(run_cli):
    line = _one_line_error(run_cli("snapshot", "ls", "--store", "s3://snapshots/x", env={"AWS_PROFILE": "nope"}))
    assert line.startswith("error: AWS_PROFILE=nope (from the environment): no such profile in ")


def test_http_endpoint_with_allow_http_false_is_named(run_cli, s3_server):
    env = {**KEYS, "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ALLOW_HTTP": "false"}
    line = _one_line_error(run_cli("snapshot", "ls", "--store", "s3://snapshots/x", env=env))
    assert line == (f"error: AWS_ENDPOINT_URL={s3_server.endpoint} (from the environment): plain HTTP is not "
                    "allowed by AWS_ALLOW_HTTP=false (from the environment); use https:// or set AWS_ALLOW_HTTP=true")


def test_a_malformed_endpoint_is_named(run_cli):
    env = {**KEYS, "AWS_ENDPOINT_URL_S3": "localhost:9000"}
    line = _one_line_error(run_cli("snapshot", "ls", "--store", "s3://snapshots/x", env=env))
    assert line == "error: AWS_ENDPOINT_URL_S3=localhost:9000 (from the environment): not an http:// or https:// URL"


def test_an_unreachable_endpoint_is_named_on_create_and_read(run_cli, image):
    env = {**KEYS, "AWS_ENDPOINT_URL": DEAD, "AWS_ALLOW_HTTP": "true", "RESTORE_STORE_DEADLINE": "1"}
    url = "s3://snapshots/dead"
    line = _one_line_error(run_cli("snapshot", "create", str(image), "--name", "fn", "--store", url, env=env))
    assert line.startswith(f"error: AWS_ENDPOINT_URL={DEAD} (from the environment): cannot connect: "
                           "connection refused (store s3://snapshots/dead: "), line
    line = _one_line_error(run_cli("snapshot", "inspect", "fn", "--store", url, env=env))
    assert line.startswith(f"error: AWS_ENDPOINT_URL={DEAD} (from the environment): cannot connect: "
                           "connection refused (store s3://snapshots/dead: "), line


def test_an_unreachable_restore_endpoint_names_the_option(run_cli):
    line = _one_line_error(run_cli("snapshot", "ls", "--store", "s3://snapshots/x", "--s3-endpoint", DEAD,
                                   "--store-deadline", "1", env=KEYS))
    assert line.startswith(f"error: --s3-endpoint={DEAD}: cannot connect: connection refused"), line


class _Dropper(socketserver.ThreadingTCPServer):
    """An endpoint that accepts every connection and closes it unanswered:
    each attempt of a request is one connection, counted."""

    daemon_threads = True

    def __init__(self) -> None:
        self.attempts = 0

        class Drop(socketserver.BaseRequestHandler):
            def handle(inner) -> None:
                self.attempts += 1

        super().__init__(("127.0.0.1", 0), Drop)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def test_the_store_deadline_bounds_the_retries(run_cli):
    """--store-deadline (or RESTORE_STORE_DEADLINE) is how long a failing
    request is retried: 0 tries once, a deadline tries again; a bad value
    exits 2 with the reason."""
    dropper = _Dropper()
    try:
        args = ["snapshot", "ls", "--store", "s3://snapshots/x", "--s3-endpoint", dropper.endpoint]
        _one_line_error(run_cli(*args, env={**KEYS, "RESTORE_STORE_DEADLINE": "0"}))
        assert dropper.attempts == 1
        dropper.attempts = 0
        _one_line_error(run_cli(*args, "--store-deadline", "0.5", env=KEYS))
        assert dropper.attempts > 1
    finally:
        dropper.close()
    r = run_cli(*args, "--store-deadline", "-1", env=KEYS)
    assert r.returncode == 2 and "-1.0 is not in the range x>=0" in r.stderr, r.stderr


# --- resolution order, without a server ------------------------------------


@pytest.mark.parametrize(
    "opts, env, region",
    [
        (S3Options(), {"AWS_DEFAULT_REGION": "eu-west-1"}, "eu-west-1"),
        (S3Options(), {"AWS_REGION": "eu-west-2", "AWS_DEFAULT_REGION": "eu-west-1"}, "eu-west-2"),
        (S3Options(region="ap-south-1"), {"AWS_REGION": "eu-west-2"}, "ap-south-1"),
        (S3Options(), {}, None),
    ],
)
def test_region_order(opts, env, region, tmp_path):
    env = {**env, "AWS_CONFIG_FILE": str(tmp_path / "none")}
    config, _, _ = _s3_settings(opts, env)
    assert config.get("region") == region


def test_key_order(tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = FILE\naws_secret_access_key = FILESECRET\n"
                     "aws_session_token = FILETOKEN\n")
    files = {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(creds)}
    # The profile file alone.
    config, _, _ = _s3_settings(S3Options(), files)
    assert (config["access_key_id"], config["secret_access_key"], config["session_token"]) == \
        ("FILE", "FILESECRET", "FILETOKEN")
    # The environment beats the file (obstore reads the environment's keys itself).
    config, _, _ = _s3_settings(S3Options(), {**files, "AWS_ACCESS_KEY_ID": "ENV", "AWS_SECRET_ACCESS_KEY": "S"})
    assert "access_key_id" not in config and "session_token" not in config
    # S3Options beat both.
    config, _, _ = _s3_settings(S3Options(access_key_id="OPT", secret_access_key="OS"),
                                {**files, "AWS_ACCESS_KEY_ID": "ENV", "AWS_SECRET_ACCESS_KEY": "S"})
    assert (config["access_key_id"], config["secret_access_key"]) == ("OPT", "OS")


def test_endpoint_order_and_http(tmp_path):
    files = {"AWS_CONFIG_FILE": str(tmp_path / "none")}
    config, allow, where = _s3_settings(S3Options(), {**files, "AWS_ENDPOINT_URL": "https://a.example"})
    assert config["endpoint"] == config["aws_endpoint_url_s3"] == "https://a.example" and not allow
    assert where == "AWS_ENDPOINT_URL=https://a.example (from the environment)"
    config, allow, _ = _s3_settings(S3Options(endpoint="http://ours:9000", endpoint_from="--s3-endpoint"),
                                    {**files, "AWS_ENDPOINT_URL_S3": "https://b.example", "AWS_ALLOW_HTTP": "no"})
    assert config["aws_endpoint_url_s3"] == "http://ours:9000" and allow
    with pytest.raises(StoreError, match=re.escape("S3Options.allow_http=False")):
        _s3_settings(S3Options(endpoint="http://ours:9000", allow_http=False), files)
    with pytest.raises(StoreError, match=re.escape("AWS_ALLOW_HTTP=maybe (from the environment): not true or false")):
        _s3_settings(S3Options(), {**files, "AWS_ALLOW_HTTP": "maybe"})


# --- az:// against Azurite ---------------------------------------------------


def test_snapshot_in_azurite_create_inspect_verify_restore(azurite, image, run_cli):
    env = azurite.env()
    url = "az://snapshots/fleet"
    out = run_cli("snapshot", "create", str(image), "--name", "fn", "--store", url, env=env, check=True).stdout
    assert out.startswith("created fn/1 in az://snapshots/fleet: 2.0 MiB of memory, 4 chunks")
    inspected = run_cli("snapshot", "inspect", "fn", "--store", url, env=env, check=True).stdout
    assert re.search(r"chunks:\s+4 ", inspected), inspected
    assert run_cli("snapshot", "verify", "fn", "--store", url, env=env, check=True).stdout == \
        "fn/1: all 4 chunks verified\n"
    tried = run_cli("try", "fn", "--pages", "200", "--store", url, env=env, check=True).stdout
    assert "every page matches the snapshot" in tried
    assert re.search(r"durable:\s+[1-9]\d* hits of [1-9]\d* requests", tried), tried
    assert "fleet/snapshots/fn/1/manifest.json" in azurite.blobs("snapshots")


def test_azurite_through_an_explicit_endpoint(azurite, monkeypatch):
    """The account's endpoint given directly (AZURE_STORAGE_ENDPOINT), not the emulator switch."""
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", f"{azurite.url}/{azurite.ACCOUNT}")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", azurite.ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", azurite.KEY)
    store = DurableStore("az://snapshots/direct")
    assert store.put("k", b"bytes") and store.get("k") == b"bytes"
    assert "direct/k" in azurite.blobs("snapshots")


def test_an_unreachable_azure_endpoint_is_named(run_cli):
    env = {"AZURE_STORAGE_ENDPOINT": f"{DEAD}/acct", "AZURE_STORAGE_ACCOUNT_NAME": "acct",
           "AZURE_STORAGE_ACCOUNT_KEY": "a2V5", "RESTORE_STORE_DEADLINE": "1"}
    line = _one_line_error(run_cli("snapshot", "ls", "--store", "az://snapshots/x", env=env))
    assert line.startswith(f"error: AZURE_STORAGE_ENDPOINT={DEAD}/acct (from the environment): cannot connect: "
                           "connection refused"), line


# --- gs:// against fake-gcs-server ---------------------------------------------


def test_snapshot_in_a_gcs_emulator_inspect_verify_restore(fake_gcs, image, run_cli, tmp_path, monkeypatch):
    """A snapshot in GCS read as a GCS user configures it (a service account
    file, GOOGLE_SERVICE_ACCOUNT): inspected, verified and restored into a
    guest. The emulator cannot take obstore's writes (see FakeGCS), so the
    snapshot is made in a local store and its objects uploaded."""
    local = tmp_path / "local"
    run_cli("snapshot", "create", str(image), "--name", "fn", "--store", f"file://{local}", check=True)
    assert fake_gcs.upload_tree("snapshots", "fleet", local) > 4
    env, url = fake_gcs.env(tmp_path), "gs://snapshots/fleet"
    listed = run_cli("snapshot", "ls", "--store", url, env=env, check=True).stdout
    assert "fn" in listed, listed
    inspected = run_cli("snapshot", "inspect", "fn", "--store", url, env=env, check=True).stdout
    assert re.search(r"chunks:\s+4 ", inspected), inspected
    assert run_cli("snapshot", "verify", "fn", "--store", url, env=env, check=True).stdout == \
        "fn/1: all 4 chunks verified\n"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with Snapshot.open(DurableStore(url), "fn") as snap, \
            Server(snap, tmp_path / "gcs.sock", ServerSettings(persist_logs=False),
                   l1=L1Cache(tmp_path / "l1")) as server:
        offsets = np.flatnonzero(np.fromfile(image, dtype=np.uint8).reshape(-1, 4096).any(axis=1))[:200] * 4096
        with Guest(server.socket_path, memory_size=image.stat().st_size) as g:
            res = g.run(reads(offsets), timeout=60)
    assert (res.sums == expected_sums(image, offsets)).all()
    tiers = server.summaries[-1].stats.tiers
    assert tiers["durable"]["hits"] == server.summaries[-1].stats.chunks_fetched > 0


def test_an_unreachable_gcs_endpoint_is_named(run_cli, tmp_path, gcs_account):
    key = gcs_account(tmp_path / "account.json", DEAD)
    env = {"GOOGLE_SERVICE_ACCOUNT": str(key), "RESTORE_STORE_DEADLINE": "1"}
    line = _one_line_error(run_cli("snapshot", "ls", "--store", "gs://snapshots/x", env=env))
    assert line.startswith(f"error: gcs_base_url={DEAD} in GOOGLE_SERVICE_ACCOUNT={key}: cannot connect: "
                           "connection refused"), line
    refused = _one_line_error(run_cli("snapshot", "ls", "--store", "gs://snapshots/x",
                                      env={**env, "GOOGLE_ALLOW_HTTP": "false"}))
    assert refused == (f"error: gcs_base_url={DEAD} in GOOGLE_SERVICE_ACCOUNT={key}: plain HTTP is not allowed "
                       "(GOOGLE_ALLOW_HTTP=false in the environment)"), refused
