"""Faults of the writes themselves and of the command line: full disks, Ctrl-C inside a write,
long or folder-like output names, --debug.

Every write goes through gfgp_cli._io.atomic_open (temporary file, fsync, rename). These tests
check what a user sees when a write fails: one line naming the real path (never the temporary
one), exit 1 for a full disk, the previous file intact, no temporary file left.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gfgp_cli import _io
from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError, DiskFullError

ROOT = Path(__file__).parents[1]


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class _FailingWriter:
    """A file-like object for torch.save that raises ``error`` after ``after`` bytes, as a full
    disk (or a Ctrl-C arriving inside the C++ writer's callback) does."""

    def __init__(self, f, error: BaseException, after: int = 1000) -> None:
        self.f, self.error, self.left = f, error, after

    def write(self, b):
        if self.left <= 0:
            raise self.error
        self.left -= len(b)
        return self.f.write(b)

    def flush(self):
        return self.f.flush()


def _save_failing(error):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        return real(obj, _FailingWriter(f, error), *args, **kwargs)

    return save


def test_full_disk_inside_torch_save_is_disk_full_naming_the_target(tmp_path, monkeypatch):
    # torch.save turns the OSError of its writer into "RuntimeError: ... unexpected pos"; the
    # failure is still reported as a full disk, against the real path.
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    monkeypatch.setattr(torch, "save", _save_failing(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFullError) as e:
        with _io.atomic_open(target, "wb") as f:
            torch.save({"w": torch.zeros(10000)}, f)
    assert str(e.value).startswith(f"no space left on device writing {target}; the previous model.pt is intact")
    assert ".tmp" not in str(e.value)
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_ctrl_c_inside_torch_save_is_keyboard_interrupt(tmp_path, monkeypatch):
    # The second Ctrl-C of a run raises KeyboardInterrupt in whatever Python code runs; inside
    # torch.save's writer it comes out as a RuntimeError, unless atomic_open restores it.
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous")
    monkeypatch.setattr(torch, "save", _save_failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_open(target, "wb") as f:
            torch.save({"w": torch.zeros(10000)}, f)
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_other_write_errors_name_the_target_not_the_temporary_file(tmp_path):
    target = tmp_path / "config.json"
    with pytest.raises(OSError) as e:
        with _io.atomic_open(target, "w") as f:
            f.write("{")
            raise OSError(errno.EIO, "Input/output error")  # a failed write names no file
    assert e.value.errno == errno.EIO and e.value.filename == str(target)
    assert _leftovers(tmp_path) == []


def test_temporary_names_stay_short_for_long_targets(tmp_path):
    # A legal 253-character name used to fail after the whole conversion: its temporary name
    # (".NAME.random.tmp") was longer than 255 characters.
    target = tmp_path / ("a" * 250 + ".pt")
    with _io.atomic_open(target, "wb") as f:
        (temporary,) = _leftovers(tmp_path)
        assert len(temporary) < 80
        f.write(b"x")
    assert target.read_bytes() == b"x"


def test_stale_temporary_files_are_matched_by_target_name(tmp_path):
    (tmp_path / ".last.pt.k3j4h5.tmp").write_bytes(b"12345")
    (tmp_path / ".best.pt.link.tmp").write_bytes(b"")
    (tmp_path / ".other.pt.abc.tmp").write_bytes(b"keep")
    (tmp_path / "last.pt").write_bytes(b"keep")
    assert _io.remove_stale_temp_files(tmp_path, ["last.pt", "best.pt"]) == (2, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc.tmp", "last.pt"]


def test_check_output_file_refuses_names_before_any_work(tmp_path):
    with pytest.raises(BadInputError, match="file name is 260 bytes long; the file system allows 255"):
        _io.check_output_file(tmp_path / ("b" * 257 + ".pt"), force=False, what="--out", example="model.pt")
    with pytest.raises(BadInputError, match=r"newdir/ names a folder \(it ends with /\); give a file path such as"):
        _io.check_output_file(f"{tmp_path}/newdir/", force=False, what="--out", example="model.pt")
    assert not (tmp_path / "newdir").exists()
    assert _io.check_output_file(tmp_path / ("a" * 250 + ".pt"), force=False, what="--out", example="m.pt")


def test_free_space_check_refuses_in_advance(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "free_bytes", lambda folder: 10 << 20)
    _io.check_free_space(tmp_path, 5 << 20, "the export")
    with pytest.raises(DiskFullError, match=r"for the export in .*: about 20.0 MiB needed, 10.0 MiB free; free some"):
        _io.check_free_space(tmp_path, 20 << 20, "the export")


# --- the command line ------------------------------------------------------------------------------


def test_convert_out_ending_in_a_slash_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--out", f"{tmp_path}/newdir/"])
    assert result.exit_code == 2, result.output
    assert "names a folder" in result.output and "newdir/model.pt" in result.output
    assert not (tmp_path / "newdir").exists()


def test_convert_out_name_too_long_is_refused_before_converting(tmp_path, monkeypatch):
    import gfgp_cli.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "convert_with_report", lambda *a, **k: pytest.fail("converted before checking --out"))
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--out", str(tmp_path / ("b" * 300 + ".pt"))])
    assert result.exit_code == 2, result.output
    assert "file name is 303 bytes long" in result.output


def test_debug_keeps_the_exit_code_and_prints_the_traceback(tmp_path):
    args = ["convert", "no_such_model", "--out", str(tmp_path / "m.pt")]
    plain = CliRunner().invoke(cli, args)
    debug = CliRunner().invoke(cli, ["--debug", *args])
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback" in debug.output and "Traceback" not in plain.output
    assert debug.output.splitlines()[-1] == plain.output.strip()


def test_ctrl_c_during_a_command_is_aborted_130(monkeypatch, tmp_path):
    import gfgp_cli.checkpoint as checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "convert_with_report", interrupted)
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 130
    assert result.output.strip() == "Aborted!"


def _tmpfs_available() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _tmpfs_available(),
                                 reason="a small tmpfs needs `unshare -rm` with mount rights (Linux user namespaces)")


@needs_tmpfs
def test_convert_onto_a_full_disk_exits_1_naming_the_file(tmp_path):
    # A real full disk: a 1 MiB tmpfs, mounted in a private mount namespace, for a ~6 MB checkpoint.
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && {sys.executable} -m gfgp_cli convert mobilenet_v3_small "
              f"--num-classes 10 --image-size 16 --out {disk}/m.pt; echo rc=$?; ls -a {disk}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert "rc=1" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: no space left on device writing {disk}/m.pt; nothing was written; free some space and run again")
    assert "Traceback" not in proc.stderr
    assert proc.stdout.split("rc=1")[1].split() == [".", ".."]  # no temporary file left on the disk


def test_a_model_that_cannot_take_the_image_size_is_one_line_naming_the_layer(tmp_path):
    result = CliRunner().invoke(cli, ["convert", "alexnet", "--image-size", "8", "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()  # torch.fx's ShapeProp traceback is not printed
    assert line.startswith("Error: shape propagation failed for an input of shape (2, 3, 8, 8) at features_2 "
                           "(MaxPool2d): Given input size: (64x1x1)")
    assert "While executing" not in line and "tlparse" not in line
