"""A full disk during `gfgp export`: exit 1 naming the file that did not fit, nothing left behind."""

from __future__ import annotations

import errno

import pytest

from gfgp_cli import _io
from gfgp_cli.errors import DiskFullError
from gfgp_cli.export import export_onnx


def test_the_model_file_on_a_full_disk(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = _io.os.fdopen
    monkeypatch.setattr(_io.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    with pytest.raises(DiskFullError, match=rf"^no space left on device writing {out}; the previous m.onnx is intact"):
        export_onnx(tiny_model, out, image_size=20, force=True)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_data_file_that_cannot_fit_is_refused_before_writing(tiny_model, tmp_path, monkeypatch):
    from gfgp_cli.export import proto

    monkeypatch.setattr(proto, "SINGLE_FILE_LIMIT", 1000)  # the tiny net's ~10 kB of weights go to a data file
    monkeypatch.setattr(_io, "free_bytes", lambda folder: 2000)
    with pytest.raises(DiskFullError, match=r"for .*m.onnx and its data file m.onnx.data in .*: about .* needed, "
                                            r"2.0 KiB free; free some space and run again"):
        export_onnx(tiny_model, tmp_path / "m.onnx", image_size=20)
    assert list(tmp_path.iterdir()) == []
