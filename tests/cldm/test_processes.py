"""ProcessIdentity: a recorded process is told running or not, and a later process with its id is not taken for it."""
from __future__ import annotations

import os
import subprocess
import sys

from cldm.processes import ProcessIdentity, process_exists

NO_SUCH_PID = 2**22 + 1  # above Linux's largest pid


def test_this_process_runs_and_its_tag_reads_back() -> None:
    me = ProcessIdentity.current()
    assert me.pid == os.getpid() and me.is_running() is True
    assert ProcessIdentity.parse(me.tag) == me
    assert ProcessIdentity.parse("12-x-0123abcd") is None and ProcessIdentity.parse("12-3") is None


def test_a_finished_process_does_not_run() -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(child.stdout)
    host = ProcessIdentity.current().host
    assert not process_exists(NO_SUCH_PID)
    assert ProcessIdentity(NO_SUCH_PID, 0, host).is_running() is False
    assert ProcessIdentity(pid, 0, host).is_running() is process_exists(pid)  # its id may have been reused


def test_another_process_with_the_same_id_is_not_the_recorded_one() -> None:
    me = ProcessIdentity.current()
    assert me.start > 0  # Linux: read from /proc
    assert ProcessIdentity(me.pid, me.start + 1, me.host).is_running() is False


def test_a_process_of_another_host_cannot_be_asked() -> None:
    me = ProcessIdentity.current()
    other_host = f"{(int(me.host, 16) + 1) % 2**32:08x}"
    assert ProcessIdentity(me.pid, me.start, other_host).is_running() is None
