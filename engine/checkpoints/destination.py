"""Where a conversion may write, and writing there without ever losing a file.

`check_outputs` refuses, before anything is read or written, a destination that is a source
(the checkpoint, a file read beside it, a --vae or --tokenizers folder), contains one, or
lies inside a source folder, whether `force` is given or not. Paths are compared as the
files they name (real paths, then device and inode), so `..`, symlinks, hard links and
another spelling of the same path are all seen through.

`Staging` writes the new output into a hidden temporary sibling of the destination and only
swaps it in once it is complete: a file with one `os.replace`; a folder by moving the old
one into the temporary folder, moving the new one in, then deleting the temporary folder.
Nothing but the destination itself and the temporary folder is ever removed, and a failed or
interrupted conversion (Ctrl-C, SIGTERM: see `terminate_as_interrupt`) leaves the
destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from dite.engine.errors import CheckpointError, InputError

PARTIAL = ".dite-partial-"


def real(path: str | os.PathLike) -> Path:
    """The absolute path with `~`, `..` and symlinks resolved (as far as it exists)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_place(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name the same file or folder (hard links and case-insensitive
    spellings included where they exist; else the same real path)."""
    ia, ib = _identity(Path(a)), _identity(Path(b))
    if ia is not None and ib is not None:
        return ia == ib
    return os.path.normcase(str(real(a))) == os.path.normcase(str(real(b)))


def within(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """Whether `inner` is `outer` or lies somewhere below it."""
    target = _identity(Path(outer))
    outer_real = os.path.normcase(str(real(outer)))
    path = real(inner)
    for place in (path, *path.parents):
        ident = _identity(place)
        if target is not None and ident is not None:
            if ident == target:
                return True
        elif os.path.normcase(str(place)) == outer_real:
            return True
    return False


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_outputs(outputs: list[Path], sources: list[Path], *, force: bool, folder: bool) -> None:
    """Refuse outputs that would destroy a source or something the user did not name.

    outputs[0] is the destination (a folder when `folder`, else a file); any others are
    files written beside it (SD3's text_encoders/*.safetensors). Raises InputError with
    one line naming the path and what to do."""
    sources = [s for s in sources if s is not None and _exists(Path(s))]
    for out in outputs:
        for source in sources:
            if same_place(out, source):
                raise InputError(f"{out} is the source {source}: converting onto it would destroy it; "
                                 "choose another destination")
            if within(source, out):
                raise InputError(f"{out} contains the source {source}: writing there would destroy it; choose a "
                                 "destination outside it")
            if Path(source).is_dir() and within(out, source):
                raise InputError(f"{out} lies inside the source folder {source}; choose a destination outside it")
    for index, out in enumerate(outputs):
        parent = real(out).parent
        blocker = next((p for p in (parent, *parent.parents) if _exists(p)), None)
        if blocker is not None and not blocker.is_dir():
            raise InputError(f"cannot write {out}: {blocker} is a file, not a folder")
        if not _exists(out):
            continue
        if real(out) == Path(real(out).anchor) or same_place(out, Path.home()) or _holds_cwd(out):
            raise InputError(f"refusing to replace {out}: it is the root, your home or holds the current folder; "
                             "choose a new destination")
        if not force:
            raise CheckpointError(f"{out} exists; pass --force (force=True) to replace it")
        wants_folder = folder and index == 0
        if out.is_dir() and not wants_folder:
            raise InputError(f"{out} is a folder and this conversion writes a file there; --force replaces a file "
                             "with a file only: give a file path (e.g. model.safetensors)")
        if not out.is_dir() and wants_folder:
            raise InputError(f"{out} is a file and this conversion writes a folder there; --force replaces a folder "
                             "with a folder only: give a folder path")


def _holds_cwd(path: Path) -> bool:
    try:
        return within(Path.cwd(), path)
    except OSError:  # the current folder was deleted
        return False


class Staging:
    """A hidden temporary folder beside `destination` to write into, and the swap at the end.

    `path` is where the output is to be written (`<tmp>/<destination name>`); files written
    beside it under the temporary folder (text_encoders/...) land beside the destination."""

    def __init__(self, destination: Path):
        self.destination = destination
        self._created: list[Path] = []
        missing = []
        parent = destination.parent
        while not _exists(parent):
            missing.append(parent)
            parent = parent.parent
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            self.root = Path(tempfile.mkdtemp(prefix=f".{destination.name}{PARTIAL}", dir=destination.parent))
        except OSError as exc:
            self._remove_created()
            raise InputError(f"cannot write in {destination.parent}: {exc.strerror or exc}") from None
        self.path = self.root / destination.name

    def final(self, written: Path) -> Path:
        """Where a file written under the temporary folder ends up."""
        return self.destination.parent / written.relative_to(self.root)

    def commit(self) -> None:
        """Move everything written into place; signals wait until the swap is done."""
        with _signals_held():
            for staged in self._top_level():
                self._swap(staged, self.final(staged))
        shutil.rmtree(self.root, ignore_errors=True)

    def _top_level(self) -> list[Path]:
        """What to move: the output itself, and each file written in folders beside it."""
        moves = []
        for entry in sorted(self.root.iterdir()):
            if entry.name == self.destination.name or entry.is_file():
                moves.append(entry)
            else:  # e.g. text_encoders/: its files join the destination's text_encoders/
                moves += sorted(p for p in entry.rglob("*") if p.is_file())
        return moves

    def _swap(self, staged: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if staged.is_file() and not (target.is_dir() and not target.is_symlink()):
            os.replace(staged, target)  # atomic: the old file (or link) is gone only once the new one is there
            return
        old = None
        if _exists(target):
            old = Path(tempfile.mkdtemp(prefix="replaced-", dir=self.root)) / target.name
            os.rename(target, old)
        try:
            os.rename(staged, target)
        except OSError as exc:
            if old is not None:
                os.rename(old, target)
            raise CheckpointError(f"could not move the converted {target.name} into place ({exc.strerror or exc}); "
                                  f"{target} is unchanged") from None

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty: never anything of the user's
        self._created = []


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait (and are delivered right after) while files are swapped."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (as Ctrl-C does) while the block runs, so the
    conversion's cleanup runs for both; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
