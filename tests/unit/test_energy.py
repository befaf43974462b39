"""Energy readers against fake hardware (this machine has neither RAPL nor an NVIDIA GPU), and cost/carbon.

The RAPL tests build a fake powercap tree and /proc/stat; the NVML tests pass a fake module whose
total-energy counter the test advances. One test runs the real nvidia-ml-py against this machine's
missing driver to check the fallback says why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.energy import (
    EnergyConfig,
    EnergyMeter,
    EnergyReadError,
    default_nvml,
    rapl_delta_uj,
    read_rapl,
)
from actors.stage_profile import profile_metrics, profile_tags, stream_profile
from workflows.costs import CostConfig, co2_g, stage_cost_usd

TICK = 100  # jiffies per second on Linux (os.sysconf("SC_CLK_TCK"))


def write_stat(path: Path, busy: int, idle: int = 1000) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\n")


def fake_rapl(root: Path, packages: dict[int, int], max_uj: int = 262_143_328_850) -> None:
    for n, uj in packages.items():
        pkg = root / f"intel-rapl:{n}"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "energy_uj").write_text(f"{uj}\n")
        (pkg / "max_energy_range_uj").write_text(f"{max_uj}\n")
        sub = root / f"intel-rapl:{n}:0"  # the package's core domain: part of it, must not be added again
        sub.mkdir(exist_ok=True)
        (sub / "energy_uj").write_text("999999999\n")
        (sub / "max_energy_range_uj").write_text(f"{max_uj}\n")


@pytest.fixture
def sysfs(tmp_path: Path) -> tuple[Path, Path]:
    root, stat = tmp_path / "powercap", tmp_path / "stat"
    fake_rapl(root, {0: 1_000_000, 1: 5_000_000})
    write_stat(stat, busy=500)
    return root, stat


def config(root: Path, stat: Path, **kw) -> EnergyConfig:
    return EnergyConfig(powercap_root=str(root), proc_stat=str(stat), **kw)


def test_rapl_sums_packages_and_apportions_by_the_stage_cpu_share(sysfs, monkeypatch):
    root, stat = sysfs
    monkeypatch.setattr("actors.energy._clock_ticks", lambda: float(TICK))
    meter = EnergyMeter(config(root, stat))
    meter.start()
    fake_rapl(root, {0: 31_000_000, 1: 15_000_000})  # +30 J and +10 J
    write_stat(stat, busy=500 + 4 * TICK)  # the node was busy 4 CPU-seconds in the window
    reading = meter.stop(cpu_s=1.0, wall_s=2.0)
    assert reading.method == "rapl"
    assert reading.cpu_j == pytest.approx(40.0 * 1.0 / 4.0)  # a quarter of the package energy
    assert reading.energy_j == reading.cpu_j and reading.gpu_j == 0.0
    assert reading.note == ""


def test_rapl_counter_wrap_is_handled():
    from actors.energy import RaplSample

    before = RaplSample({"p0": 990}, {"p0": 1000}, 0)
    after = RaplSample({"p0": 15}, {"p0": 1000}, 0)
    assert rapl_delta_uj(before, after) == 25  # 10 to the wrap, 15 after it


def test_rapl_wrap_through_the_meter(sysfs, monkeypatch):
    root, stat = sysfs
    monkeypatch.setattr("actors.energy._clock_ticks", lambda: float(TICK))
    fake_rapl(root, {0: 999_000_000}, max_uj=1_000_000_000)
    for p in root.glob("intel-rapl:1*"):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    meter = EnergyMeter(config(root, stat))
    meter.start()
    fake_rapl(root, {0: 2_000_000}, max_uj=1_000_000_000)  # wrapped: 1 J to the top + 2 J
    write_stat(stat, busy=500 + 1 * TICK)
    reading = meter.stop(cpu_s=5.0, wall_s=5.0)  # share capped at 1
    assert reading.cpu_j == pytest.approx(3.0)


def test_no_rapl_falls_back_to_the_estimate_and_says_why(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, 1)
    meter = EnergyMeter(config(tmp_path / "absent", stat, cpu_watts_per_core=12.0))
    meter.start()
    reading = meter.stop(cpu_s=2.5, wall_s=3.0)
    assert reading.method == "estimate"
    assert reading.energy_j == pytest.approx(30.0)
    assert "no RAPL packages" in reading.note
    assert reading.tags()["tierflow.energy.method"] == "estimate"


def test_unreadable_rapl_counter_falls_back(sysfs):
    root, stat = sysfs
    target = root / "intel-rapl:0" / "energy_uj"
    target.unlink()
    target.mkdir()  # reading it fails (as a root-only file does for a normal user)
    meter = EnergyMeter(config(root, stat))
    meter.start()
    reading = meter.stop(cpu_s=1.0, wall_s=1.0)
    assert reading.method == "estimate" and "rapl:" in reading.note and "intel-rapl:0" in reading.note


def test_permission_error_names_the_fix(sysfs, monkeypatch):
    root, stat = sysfs
    real_open = open

    def deny(path, *a, **kw):
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(EnergyReadError, match=r"not readable.*grant read access"):
        read_rapl(str(root), str(stat))


class FakeNVML:
    """The slice of pynvml the meter calls; counters in mJ, advanced by the test."""

    def __init__(self, counters: dict[int, int]) -> None:
        self.counters = counters

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # pynvml's names
        if i not in self.counters:
            raise RuntimeError(f"NVMLError_InvalidArgument: no GPU {i}")
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return self.counters[handle]


def test_nvml_counts_only_the_assigned_gpus(tmp_path):
    nvml = FakeNVML({0: 1_000_000, 1: 2_000_000, 2: 0})
    stat = tmp_path / "stat"
    write_stat(stat, 1)
    meter = EnergyMeter(config(tmp_path / "none", stat), gpu_ids=[0, 1], on_cuda=True, nvml_factory=lambda: nvml)
    meter.start()
    nvml.counters = {0: 1_250_000, 1: 2_500_000, 2: 9_999_999}  # GPU 2 is someone else's
    reading = meter.stop(cpu_s=1.0, wall_s=10.0)
    assert reading.gpu_j == pytest.approx(750.0)
    assert reading.method == "nvml+estimate"  # CPU part estimated: no RAPL here
    assert reading.energy_j == pytest.approx(750.0 + 10.0)


def test_nvml_failure_falls_back_to_declared_gpu_watts(tmp_path):
    def broken():
        raise EnergyReadError("NVML did not initialise (NVMLError_DriverNotLoaded)")

    stat = tmp_path / "stat"
    write_stat(stat, 1)
    meter = EnergyMeter(
        config(tmp_path / "none", stat, gpu_watts=100.0), gpu_ids=["0"], on_cuda=True, nvml_factory=broken
    )
    meter.start()
    reading = meter.stop(cpu_s=0.0, wall_s=2.0)
    assert reading.gpu_j == pytest.approx(200.0) and reading.method == "estimate"
    assert "DriverNotLoaded" in reading.note


def test_unknown_gpu_id_falls_back(tmp_path):
    nvml = FakeNVML({0: 0})
    meter = EnergyMeter(EnergyConfig(use_rapl=False), gpu_ids=[3], on_cuda=True, nvml_factory=lambda: nvml)
    meter.start()
    reading = meter.stop(cpu_s=0.0, wall_s=1.0)
    assert reading.method == "estimate" and "GPU 3" in reading.note


def test_a_gpu_that_torch_cannot_use_draws_no_stage_energy():
    meter = EnergyMeter(EnergyConfig(use_rapl=False), gpu_ids=[0], on_cuda=False)
    meter.start()
    assert meter.stop(cpu_s=1.0, wall_s=1.0).gpu_j == 0.0


def test_real_nvml_without_a_driver_raises_a_read_error():
    pytest.importorskip("pynvml")
    try:
        nvml = default_nvml()
    except EnergyReadError as exc:
        assert "NVML" in str(exc)
    else:  # pragma: no cover - a machine with a driver
        nvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")


def test_config_validation_and_env():
    with pytest.raises(ValueError, match="cpu_watts_per_core"):
        EnergyConfig(cpu_watts_per_core=-1)
    with pytest.raises(ValueError, match=r"TIERFLOW_CPU_WATTS_PER_CORE=12\.5"):
        EnergyConfig.from_env({"TIERFLOW_CPU_WATTS_PER_CORE": "lots"})
    cfg = EnergyConfig.from_env({"TIERFLOW_CPU_WATTS_PER_CORE": "7", "TIERFLOW_POWERCAP_ROOT": "/x"})
    assert cfg.cpu_watts_per_core == 7.0 and cfg.powercap_root == "/x"


def test_stream_profile_is_an_estimate_and_logs_as_metrics():
    prof = stream_profile(wall_s=2, busy_s=3, workers=2, rows=10, out_bytes=100, config=EnergyConfig())
    assert prof["energy_j"] == pytest.approx(30.0) and prof["energy_method"] == "estimate"
    m = profile_metrics(prof)
    assert m["energy_j"] == pytest.approx(30.0) and m["profile.cpu_s"] == 3.0 and "profile.energy_j" not in m
    assert profile_tags(prof)["tierflow.energy.method"] == "estimate"


def test_carbon_and_cost():
    cfg = CostConfig(grid_gco2_per_kwh=200.0)
    assert co2_g(3.6e6, cfg) == pytest.approx(200.0)  # 1 kWh
    assert stage_cost_usd({"CPU": 2, "GPU": 1, "licence": 1}, 1800, CostConfig()) == pytest.approx(
        (2 * 0.048 + 0.814) / 2
    )
    spec = {"resources": {"CPU": 16}, "node_config": {"InstanceType": "m5.4xlarge"}}
    assert CostConfig().node_price_usd_per_h("worker_cpu", spec) == pytest.approx(0.768)
    assert CostConfig(node_type_usd_per_h={"worker_cpu": 0.3}).node_price_usd_per_h("worker_cpu", spec) == 0.3
    unknown = {"resources": {"CPU": 4, "GPU": 1}, "node_config": {"InstanceType": "x9.huge"}}
    assert CostConfig().node_price_usd_per_h("t", unknown) == pytest.approx(4 * 0.048 + 0.814)
    with pytest.raises(ValueError, match="grid_gco2_per_kwh"):
        CostConfig(grid_gco2_per_kwh=float("nan"))
