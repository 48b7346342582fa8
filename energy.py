"""GPU energy through NVML (nvidia-ml-py, import name `pynvml`): paper §5.2 "energy (NVML joules)",
"Computation of FLOPs/energy" and Fig. 6. Power is sampled on a background thread and integrated by
the trapezoid rule, J = sum_t (t_t - t_{t-1}) / 2 (P_{t-1} + P_t), beside NVML's own total-energy
counter where the GPU has one. Without NVML every energy field is NaN and the reason is recorded;
nothing here raises.

    with EnergyMeter(nvml_index("cuda:0")) as meter:
        train_one_epoch(...)
    meter.as_dict(images)   # energy_j, energy_counter_j, energy_status, energy_seconds, J/image
"""

import contextlib
import threading
import time

import torch


def nvml_status() -> tuple[bool, str]:
    """(available, reason): NVML through nvidia-ml-py (import name pynvml)."""
    try:
        import pynvml
    except ImportError as e:
        return False, f"nvidia-ml-py not installed ({e})"
    try:
        pynvml.nvmlInit()
        try:
            driver, gpus = pynvml.nvmlSystemGetDriverVersion(), pynvml.nvmlDeviceGetCount()
            return True, f"NVML ok: driver {driver}, {gpus} GPU(s)"
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        return False, f"NVML unavailable: {e}"


def nvml_index(device) -> int:
    """NVML's index of a CUDA device, for EnergyMeter: NVML counts GPUs in PCI order and ignores
    CUDA_VISIBLE_DEVICES, CUDA need not, so match the PCI address. 0 off CUDA or without NVML."""
    device = torch.device(device)
    if device.type != "cuda" or not nvml_status()[0]:
        return 0
    import pynvml

    p = torch.cuda.get_device_properties(device)
    pynvml.nvmlInit()
    try:  # NVML reads a PCI address as domain:bus:device, in hexadecimal
        pci = f"{p.pci_domain_id:x}:{p.pci_bus_id:x}:{p.pci_device_id:x}"
        return pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByPciBusId(pci))
    except pynvml.NVMLError:  # not found
        return device.index or 0
    finally:
        pynvml.nvmlShutdown()


def trapezoid_joules(times_s, watts) -> float:
    """J = sum_t (t_t - t_{t-1})/2 (P_{t-1} + P_t) (paper, "Computation of FLOPs/energy")."""
    t, p = [float(v) for v in times_s], [float(v) for v in watts]
    if len(t) != len(p):
        raise ValueError(f"times_s and watts differ in length ({len(t)} vs {len(p)})")
    if any(b <= a for a, b in zip(t, t[1:])):
        raise ValueError("times_s must be strictly increasing")
    return sum((t1 - t0) / 2 * (p0 + p1) for t0, t1, p0, p1 in zip(t, t[1:], p, p[1:]))


class EnergyMeter:
    """GPU energy over a `with` block (§5.2): power sampled every `interval_s` on a background
    thread and integrated by the trapezoid rule (`joules`), beside the difference of NVML's
    total-energy counter where the GPU has one (`counter_joules`). Without NVML every energy field
    is NaN and `status` says why; never raises."""

    def __init__(self, index=0, interval_s=0.05):
        self.index, self.interval_s = index, interval_s
        self.joules = self.counter_joules = self.seconds = float("nan")
        self.status, self._nvml, self._samples, self._stop = "", None, [], threading.Event()

    def _counter_mj(self):
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # mJ since loaded
        except self._nvml.NVMLError:
            return None  # not supported on this GPU

    def _sample(self):
        with contextlib.suppress(self._nvml.NVMLError):  # a missed sample only widens a trapezoid
            watts = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000
            self._samples.append((time.perf_counter(), watts))

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self):
        self._t0 = time.perf_counter()
        ok, self.status = nvml_status()
        if ok:
            import pynvml

            try:
                pynvml.nvmlInit()
                self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.index)
            except pynvml.NVMLError as e:
                self.status = f"NVML unavailable: {e}"
                return self
            self._c0 = self._counter_mj()
            self._sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        if self._nvml is not None:  # NVML was opened: close it
            self._stop.set()
            self._thread.join()
            self._sample()
            c1 = self._counter_mj()
            if len(self._samples) >= 2:
                self.joules = trapezoid_joules(*zip(*self._samples))
            if self._c0 is not None and c1 is not None:
                self.counter_joules = (c1 - self._c0) / 1000
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()

    def as_dict(self, images=None) -> dict:
        """Fields of an epoch log. NaN stays NaN: Python's json writes it as NaN (allow_nan)."""
        return {"energy_j": self.joules, "energy_counter_j": self.counter_joules,
                "energy_status": self.status, "energy_seconds": self.seconds,
                "energy_j_per_image": self.joules / images if images else float("nan")}
