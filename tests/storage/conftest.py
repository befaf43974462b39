"""Back-ends for the storage conformance suite: memory, local directories and S3 on a real
S3-compatible server (moto's server mode) bound to loopback."""

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from storage import ArtifactStore, StoreConfig, TierSpec

S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, **S3_CREDENTIALS)
    fs.mkdir("tierflow-test")
    yield endpoint
    server.stop()


def s3_spec(endpoint: str, role: str = "durable", **kw) -> TierSpec:
    opts = {"endpoint_url": endpoint, "use_listings_cache": False, **S3_CREDENTIALS}
    return TierSpec(f"s3://tierflow-test/{uuid.uuid4().hex}", role, storage_options=opts, **kw)


COMBOS = ["local", "memory+local", "warm+local", "memory+warm+local", "s3", "memory+s3", "warm+s3"]


def build_specs(combo: str, tmp: Path, endpoint: str | None, capacity: int | None = None) -> list[TierSpec]:
    specs = []
    for part in combo.split("+"):
        if part == "memory":
            specs.append(TierSpec(f"memory://conf-{uuid.uuid4().hex}", "hot", capacity_bytes=capacity or 1 << 30))
        elif part == "warm":
            specs.append(TierSpec(str(tmp / "warm"), "warm", capacity_bytes=capacity or 1 << 30))
        elif part == "local":
            specs.append(TierSpec(str(tmp / "durable"), "durable"))
        elif part == "s3":
            specs.append(s3_spec(endpoint))
    return specs


@pytest.fixture(params=COMBOS)
def combo(request):
    return request.param


@pytest.fixture
def make_store(combo, tmp_path, request):
    """Stores over the same tiers (same paths, same S3 prefix, same memory space) per test."""
    endpoint = request.getfixturevalue("s3_endpoint") if "s3" in combo else None
    specs = build_specs(combo, tmp_path, endpoint)

    def make(capacity: int | None = None, **config) -> ArtifactStore:
        tiers = [replace(t, capacity_bytes=capacity) if capacity and t.role != "durable" else t for t in specs]
        return ArtifactStore(StoreConfig(tuple(tiers), **config))

    return make
