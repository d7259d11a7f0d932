"""gfgp keeps freed CPU memory for reuse (glibc mallopt) unless told not to or the user chose an allocator.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone.
The observable effect: with reuse, a 64 MiB tensor comes from the heap (the program break grows
and the block lies below it); with glibc's defaults it is a separate mmap above the break.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

_PROBE = r"""
import ctypes, json, sys
import torch
from gfgp_cli import cpu_memory
if sys.argv[1] == "cli":
    from gfgp_cli.cli import cli
    cli.main(args=sys.argv[2:], prog_name="gfgp", standalone_mode=False)
elif sys.argv[1] == "call":
    cpu_memory.reuse_freed_memory()
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_ssize_t]
before = libc.sbrk(0)
t = torch.ones(64 * 2**20, dtype=torch.uint8)
after = libc.sbrk(0)
print(json.dumps({"description": cpu_memory.allocator_description(),
                  "from_heap": after > before and t.data_ptr() + t.numel() <= after}))
"""


def _probe(*args: str, env: dict | None = None) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    environ.update(env or {})
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=environ,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_glibc_maps_large_blocks_separately():
    result = _probe("none")
    assert not result["from_heap"]
    assert "freed large blocks go back to the OS" in result["description"]


def test_reuse_freed_memory_serves_large_blocks_from_the_heap():
    result = _probe("call")
    assert result["from_heap"]
    assert "kept for reuse" in result["description"]


def test_the_cli_reuses_by_default_and_releases_when_asked():
    # The group's options take effect before any subcommand parses its own (here: --help).
    assert _probe("cli", "convert", "--help")["from_heap"]
    assert not _probe("cli", "--release-cpu-memory", "convert", "--help")["from_heap"]


def test_a_users_allocator_setting_is_left_alone():
    result = _probe("call", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert not result["from_heap"]
    assert result["description"] == "glibc malloc as set by MALLOC_MMAP_THRESHOLD_: left as chosen"
