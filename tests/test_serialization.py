"""Saving a folder atomically when processes get killed: leftovers of dead processes are removed by the
next save, and an overwrite leaves the old or the new folder in place at every moment, never neither."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_maiht import serialization
from optimum_maiht.serialization import atomic_directory, check_output_folder, remove_leftovers


def dead_pid() -> int:
    """A process id no process can have (above the kernel's maximum)."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def save(target: Path, text: str, overwrite: bool = True) -> None:
    with atomic_directory(target, overwrite=overwrite) as tmp:
        (tmp / "weights.txt").write_text(text)


def test_leftovers_of_dead_processes_are_removed_by_the_next_save(tmp_path):
    target = tmp_path / "out"
    save(target, "old")
    dead, alive = dead_pid(), os.getpid()
    for name in (
        f".out.tmp-{dead}-abc",
        f".out.old-{dead}",
        f".out.tmp-{alive}-xyz",
        ".other.tmp-1-a",
        ".out.tmp-x",
    ):
        (tmp_path / name).mkdir()
    save(target, "new")
    assert (target / "weights.txt").read_text() == "new"
    kept = {".other.tmp-1-a", ".out.tmp-x", f".out.tmp-{alive}-xyz", "out"}  # another's, unknown, alive
    assert {p.name for p in tmp_path.iterdir()} == kept


def test_an_old_folder_whose_target_vanished_is_put_back(tmp_path):
    """The two-rename fallback killed between its renames: the next save restores the old folder first."""
    old = tmp_path / f".out.old-{dead_pid()}"
    old.mkdir()
    (old / "weights.txt").write_text("old")
    remove_leftovers(tmp_path / "out")
    assert (tmp_path / "out" / "weights.txt").read_text() == "old" and not old.exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_the_folder_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # a system without RENAME_EXCHANGE
        monkeypatch.setattr(serialization, "exchange_folders", lambda a, b: False)
    target = tmp_path / "out"
    save(target, "old")
    (target / "stale.txt").write_text("x")
    save(target, "new")
    assert sorted(p.name for p in target.iterdir()) == ["weights.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch):
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    for output in (".", "..", str(tmp_path), str(here)):
        with pytest.raises(ValueError, match="current folder or one of its parents"):
            check_output_folder(output, overwrite=True)
    assert check_output_folder("sub", overwrite=True) == here / "sub"


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from optimum_maiht import serialization

target, moment = Path(sys.argv[1]), sys.argv[2]
exchange = serialization.exchange_folders
rename = Path.rename

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "after-exchange":
    serialization.exchange_folders = lambda a, b: exchange(a, b) and kill()
else:  # the fallback's two renames, killed between them
    serialization.exchange_folders = lambda a, b: False
    Path.rename = lambda self, other: (rename(self, other), kill())
with serialization.atomic_directory(target, overwrite=True) as tmp:
    (tmp / "weights.txt").write_text("new")
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["after-exchange", "between-renames"])
def test_a_save_killed_while_it_replaces_the_folder(tmp_path, moment):
    """SIGKILL inside the overwrite. With the atomic exchange the target holds the new folder at once; in
    the fallback the kill leaves the old one aside, which the next save puts back before it proceeds."""
    target = tmp_path / "out"
    save(target, "old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target), moment], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL
    if moment == "after-exchange":
        assert (target / "weights.txt").read_text() == "new"
    else:
        assert not target.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers, "the killed save left its temporary or old folder"
    remove_leftovers(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "weights.txt").read_text() == ("new" if moment == "after-exchange" else "old")
