"""The CPU recorded beside every benchmark figure is read correctly from ``/proc/cpuinfo``."""

from __future__ import annotations

import builtins

from mvitv2.utils import machine

# Two logical processors as Linux prints them (abridged); the second differs so that reading it
# instead of the first would show.
_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx512_bf16 avx2 fma avx512f avx512_vnni avx512vl
bugs\t\t: sysret_ss_attrs

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel Xeon
flags\t\t: fpu avx2 avx512f amx_tile amx_bf16
"""


def test_cpuinfo_gives_the_first_processor_s_name_numbers_and_kernel_flags_in_report_order():
    assert machine.parse_cpuinfo(_CPUINFO) == {
        "model_name": "AMD EPYC",
        "family": "26",
        "model": "2",
        "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"],
    }
    intel = machine.parse_cpuinfo(_CPUINFO.split("\n\n")[1])
    assert intel == {
        "model_name": "Intel Xeon",
        "family": "6",
        "model": "207",
        "flags": ["avx2", "avx512f", "amx_tile", "amx_bf16"],
    }


def test_missing_cpuinfo_fields_read_as_question_marks():
    assert machine.parse_cpuinfo("processor\t: 0\nmodel name\t: Some CPU: rev 2\n") == {
        "model_name": "Some CPU: rev 2",  # only the first colon separates key and value
        "family": "?",
        "model": "?",
        "flags": [],
    }
    assert machine.parse_cpuinfo("processor\t: 0\ncpu family\t: 25\nflags\t: avx2\n") == {
        "model_name": "?",
        "family": "25",
        "model": "?",
        "flags": ["avx2"],
    }


def test_description_names_the_cpu_its_numbers_count_and_flags_and_says_when_amx_is_absent():
    amd = {**machine.parse_cpuinfo(_CPUINFO), "cpus": 2}
    assert machine.describe_cpu(amd) == (
        "AMD EPYC (family 26, model 2), 2 CPUs; avx2 avx512f avx512_vnni avx512_bf16; no AMX"
    )
    intel = {**machine.parse_cpuinfo(_CPUINFO.split("\n\n")[1]), "cpus": 4}
    assert machine.describe_cpu(intel) == (
        "Intel Xeon (family 6, model 207), 4 CPUs; avx2 avx512f amx_tile amx_bf16"
    )
    bare = {"model_name": "arm64", "family": "?", "model": "?", "flags": [], "cpus": 8}
    assert machine.describe_cpu(bare) == "arm64 (family ?, model ?), 8 CPUs; no kernel flags read"
    assert machine.describe_cpu() == machine.describe_cpu(machine.cpu_info())  # this machine


def test_without_proc_cpuinfo_the_platform_s_processor_is_named(monkeypatch):
    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(machine.platform, "processor", lambda: "arm")
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 3)
    assert machine.cpu_info() == {
        "model_name": "arm",
        "family": "?",
        "model": "?",
        "flags": [],
        "cpus": 3,
    }
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
    assert machine.cpu_info()["model_name"] == "aarch64"


def test_this_machine_s_cpu_is_the_parse_of_its_own_cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            want = machine.parse_cpuinfo(f.read())
    except OSError:
        return  # not Linux: covered by the test above
    got = machine.cpu_info()
    assert {k: got[k] for k in want} == want and got["cpus"] == machine.os.cpu_count()
