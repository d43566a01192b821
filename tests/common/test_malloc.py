"""glibc malloc arenas: a worker capped at one arena keeps every thread's memory in it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.system.malloc import limit_malloc_arenas

REPO = Path(__file__).resolve().parents[2]

# Threads alive together, each allocating through malloc (bytearrays above pymalloc's limit),
# then glibc's own report of its arenas ("<heap nr=...>" per arena).
PROBE = """
import ctypes, sys, threading
from common.system.malloc import limit_malloc_arenas
print(limit_malloc_arenas(int(sys.argv[1])))
barrier = threading.Barrier(8)
def work():
    bufs = [bytearray(100_000) for _ in range(20)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
fp = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.malloc_info(0, fp)
libc.fclose.argtypes = [ctypes.c_void_p]
libc.fclose(fp)
"""


def _arenas(limit: int, tmp_path: Path) -> tuple[str, int]:
    out = tmp_path / f"malloc-{limit}.xml"
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(limit), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip(), out.read_text().count("<heap nr=")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_one_arena_holds_every_thread(tmp_path: Path) -> None:
    applied, capped = _arenas(1, tmp_path)
    assert applied == "True" and capped == 1
    untouched, default = _arenas(0, tmp_path)
    assert untouched == "False" and default > 1  # glibc's default: an arena per thread


def test_zero_leaves_malloc_alone() -> None:
    assert limit_malloc_arenas(0) is False
