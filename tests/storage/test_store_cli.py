"""`tierflow store ls | info | verify | gc` as users run them, and the README's config example."""

import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from storage import ArtifactStore, StoreConfig
from storage.store import blob_key

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workflows", "store", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_store_commands(tmp_path):
    urls = f"{tmp_path / 'warm'},{tmp_path / 'durable'}"
    store = ArtifactStore(StoreConfig.from_urls(urls))
    ref = store.put(pa.table({"x": [1, 2, 3]}), run_id="run-1", stage="prep")
    orphan = store.put_blob(b"nobody references me")

    ls = cli("ls", "--store", urls)
    assert ls.returncode == 0 and "run-1" in ls.stdout and "prep" in ls.stdout and ref.digest[:16] in ls.stdout

    info = cli("info", "run-1/prep", "--store", urls)
    assert info.returncode == 0 and ref.digest in info.stdout
    assert re.search(rf"ok\s+{re.escape(str(tmp_path / 'warm'))}", info.stdout)
    assert cli("info", ref.digest[:10], "--store", urls).returncode == 0
    bad = cli("info", "../etc", "--store", urls)
    assert bad.returncode == 2 and "run id '..' looks like a path" in bad.stdout
    short = cli("info", "abc", "--store", urls)
    assert short.returncode == 2 and "neither RUN/STAGE nor a digest prefix" in " ".join(short.stdout.split())

    (tmp_path / "warm" / blob_key(ref.digest)).write_bytes(b"bit rot")
    assert re.search(r"corrupt\s+\S+warm", cli("info", "run-1/prep", "--store", urls).stdout)
    verify = cli("verify", "--store", urls)
    assert verify.returncode == 0, verify.stdout
    assert f"repaired: blob {ref.digest} in {tmp_path / 'warm'}" in verify.stdout
    assert (tmp_path / "warm" / blob_key(ref.digest)).read_bytes() != b"bit rot"

    (tmp_path / "warm" / blob_key(ref.digest)).write_bytes(b"bit rot")
    (tmp_path / "durable" / blob_key(ref.digest)).write_bytes(b"bit rot")
    broken = cli("verify", "--store", urls)
    assert broken.returncode == 1 and "unrecoverable" in broken.stdout and "NOT OK" in broken.stdout

    dry = cli("gc", "--dry-run", "--min-age-s", "0", "--store", urls)
    assert dry.returncode == 0 and orphan in dry.stdout and ref.digest not in dry.stdout
    assert (tmp_path / "durable" / blob_key(orphan)).exists()
    assert cli("gc", "--min-age-s", "0", "--store", urls).returncode == 0
    assert not (tmp_path / "durable" / blob_key(orphan)).exists()


def test_the_documented_toml_example_is_a_valid_store_config(tmp_path):
    page = (REPO / "docs" / "configuration.md").read_text()
    block = re.search(r"```toml\n(.*?)```", page, re.S).group(1)
    (tmp_path / "tierflow.toml").write_text(block)
    cfg = StoreConfig.from_file(tmp_path / "tierflow.toml")
    assert [(t.role, t.capacity_bytes) for t in cfg.tiers] == [("hot", 2**30), ("warm", 50 * 2**30), ("durable", None)]
    assert cfg.tiers[-1].encryption_key == "file:/etc/tierflow/store.key" and not cfg.allow_pickle
