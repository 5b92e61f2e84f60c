"""Host memory: retained, freed blocks are reused without new page faults; returned, they leave no resident gaps."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

# A training step in miniature, repeated: tensors of 64, 4, 56 and 16 MiB (two above glibc's largest mmap
# threshold, 32 MiB) allocated, filled and freed. Prints the page faults and the resident MiB after each
# repetition. Runs in a fresh process, since the setting lasts for the process.
PROBE = """
import json, resource, sys, torch
from cldm.host_memory import retain_freed_host_memory

if sys.argv[1] == "retain":
    assert retain_freed_host_memory()
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(mib * 2**18) for mib in (64, 4, 56, 16)]
    del tensors
    resident = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, resident
print(json.dumps([step() for _ in range(6)]))
"""


def _steps(mode: str) -> list[tuple[int, float]]:
    process = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=120, check=True)
    return json.loads(process.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_large_blocks_are_reused_without_page_faults_or_growth():
    released, retained = _steps("release"), _steps("retain")
    assert released[-1][0] > 0  # glibc maps fresh blocks, whose pages fault in again every step
    assert retained[-1][0] * 10 < released[-1][0], (retained, released)
    assert retained[-1][1] == retained[-2][1]  # the heap has settled: steps reuse it, nothing grows


# What a checkpoint tool does: a large block freed (glibc raises its mmap threshold to its size), then outputs kept
# while the inputs they are computed from are freed, each pair a little larger than the last (so no freed input's
# place fits the next). Prints the resident MiB at the end.
TOOL_PROBE = """
import resource, sys, torch
from cldm.host_memory import return_freed_host_memory

if sys.argv[1] == "return":
    assert return_freed_host_memory()
torch.ones(16 * 2**18)  # allocated and freed
kept = []
for step in range(50):
    source = torch.ones(2**20 + step * 2**14)  # 4 MiB and 64 KiB more each step
    kept.append(source + 1)
    del source
print(int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_returned_memory_leaves_no_resident_gaps_between_kept_tensors():
    def resident(mode: str) -> float:
        process = subprocess.run([sys.executable, "-c", TOOL_PROBE, mode], cwd=REPO_ROOT, capture_output=True,
                                 text=True, timeout=120, check=True)
        return float(process.stdout.splitlines()[-1])

    # By default the freed inputs stay resident between the kept outputs (50 x 4-7 MiB); returned, they do not.
    assert resident("default") - resident("return") > 100


def test_other_c_libraries_are_left_alone(monkeypatch):
    from cldm import host_memory

    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.retain_freed_host_memory() is False
    assert host_memory.return_freed_host_memory() is False
