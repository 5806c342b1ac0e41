"""Where output goes: a regular file is replaced atomically, and what is not a regular file (a
device, a named pipe, this process's standard output) is written to, never replaced."""

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ppl_models.files import WriteError, atomic_write, write_json

ROOT = Path(__file__).resolve().parents[1]


def test_a_named_pipe_is_written_to_and_stays_a_pipe(tmp_path):
    pipe = tmp_path / "answers"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()))
    reader.start()
    write_json({"mean": -1.5}, pipe)
    reader.join(timeout=30)
    assert json.loads(received[0]) == {"mean": -1.5}
    assert stat.S_ISFIFO(pipe.stat().st_mode)


def test_devices_are_written_to_and_stay_devices():
    write_json({"mean": -1.5}, "/dev/null")
    with pytest.raises(WriteError) as full:  # numpy's own writer says a full disk without an errno: not here
        atomic_write("/dev/full", lambda file: np.save(file, np.zeros((100, 784))))
    assert str(full.value) == "No space left on device writing /dev/full"
    assert all(stat.S_ISCHR(os.stat(device).st_mode) for device in ("/dev/null", "/dev/full"))


def test_a_link_to_a_file_keeps_its_link_and_the_file_is_replaced(tmp_path):
    (tmp_path / "kept.json").write_text("old")
    (tmp_path / "link.json").symlink_to("kept.json")
    write_json([1], tmp_path / "link.json")
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "kept.json").read_text()) == [1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.json", "link.json"]  # no part left


@pytest.mark.parametrize("to_file", [True, False])
def test_dev_stdout_reaches_the_file_or_pipe_the_shell_gave(tmp_path, to_file):
    """(As root, replacing /dev/stdout would have replaced the device link itself.)"""
    program = ("import sys; from ppl_models.files import write_json; print('before', flush=True); "
               "write_json({'mean': -1.5}, '/dev/stdout'); write_json({'also': 1}, '/dev/stderr'); print('after')")
    out = tmp_path / "out.txt"
    with open(out, "w") if to_file else open(os.devnull) as stdout:
        done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, timeout=120, text=True,
                              stdout=stdout if to_file else subprocess.PIPE, stderr=subprocess.PIPE)
    assert done.returncode == 0, done.stderr
    printed = out.read_text() if to_file else done.stdout
    assert printed == 'before\n{\n  "mean": -1.5\n}\nafter\n', printed
    assert json.loads(done.stderr) == {"also": 1}
    assert os.path.islink("/dev/stdout")
