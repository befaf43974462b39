"""The per-run log: tierflow's lines reach the terminal, everything else (any fd-1/2 writer) the file."""

import subprocess
import sys
import textwrap
from pathlib import Path

from storage import ArtifactStore, StoreConfig
from workflows.runlog import RunLog, read_log

SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from workflows.runlog import RunLog
    logging.basicConfig(level=logging.INFO)
    with RunLog(Path(sys.argv[1]), stream=sys.argv[2] == "1") as term:
        print("TIERFLOW line", file=term)
        print("python stdout noise")
        os.write(2, b"C-level stderr noise\\n")
        subprocess.run([sys.executable, "-c", "print('child process noise')"], check=True)
        warnings.warn("library warning noise", stacklevel=1)
        logging.getLogger("ray").info("ray INFO noise")
        logging.getLogger("workflows.engine").warning("tierflow warning")
    print("after: back on stdout")
    """
)
NOISE = (
    "python stdout noise",
    "C-level stderr noise",
    "child process noise",
    "library warning noise",
    "ray INFO noise",
)


def run_script(tmp_path: Path, stream: bool) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "run.log"
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), "1" if stream else "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return p, log.read_text()


def test_only_tierflow_lines_reach_the_terminal(tmp_path):
    p, log = run_script(tmp_path, stream=False)
    # tierflow's own warnings still show
    assert p.stdout.splitlines() == [
        "TIERFLOW line",
        "WARNING workflows.engine: tierflow warning",
        "after: back on stdout",
    ]
    assert p.stderr == ""
    assert not any(n in p.stdout + p.stderr for n in NOISE)
    assert all(n in log for n in NOISE)


def test_verbose_streams_the_log_and_still_keeps_it(tmp_path):
    p, log = run_script(tmp_path, stream=True)
    assert "TIERFLOW line" in p.stdout
    assert all(n in log for n in NOISE)
    assert all(n in p.stderr for n in NOISE)


def test_the_log_is_kept_in_the_store_and_read_back(tmp_path):
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "store")]))
    runlog = RunLog(tmp_path / "local.log")
    runlog.path.write_text("ray said things\n")
    where = runlog.keep(store, "r-1")
    assert where.endswith("runs/r-1/run.log")
    runlog.path.unlink()
    assert read_log(store, "r-1") == b"ray said things\n"
