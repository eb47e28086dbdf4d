"""Atomic writes: an output is either complete and in place, or absent; and the one table sink.

Every output goes to a temporary sibling renamed into place with ``os.replace``.
Invariants: output paths are literal names (a temporary of ``NAME`` is
``.NAME.XXXXXXXX.tmp``, ``.old`` or ``.parts``, matched as a string, never a glob);
each temporary is ``flock``-ed by its run while it lives and clean-up removes only
unlocked ones, so concurrent runs never delete each other's work (the last rename
wins); a failed write leaves nothing (its temporary and the directories it created
go) and its ``OSError`` names the output; new files get ``0666 & ~umask``
(directories ``0777``), or the mode of the file they replace.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from budgetalloc.errors import BudgetallocError

TEMP_SUFFIXES = (".tmp", ".old", ".parts")
_RANDOM_PART = re.compile(r"[a-z0-9_]{8}")  # tempfile's random name part


# -- modes ---------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read from /proc where possible, which changes nothing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(target: Path, *, directory: bool) -> int:
    """The mode a new output gets: that of the file it replaces, else the umask's."""
    try:
        st = os.lstat(target)
        if stat.S_ISDIR(st.st_mode) == directory and not stat.S_ISLNK(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return (0o777 if directory else 0o666) & ~current_umask()


# -- temporaries ---------------------------------------------------------------------------


def claim_temp(target: Path, suffix: str, *, directory: bool) -> tuple[Path, int]:
    """Create a temporary sibling of ``target``, locked (``flock``) by this process.

    Returns:
        ``(path, fd)``: keep ``fd`` open while the temporary is in use; closing it
        releases the lock (so does the death of the process).
    """
    prefix = f".{_stem(target.name)}."
    for _ in range(100):
        if directory:
            tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent)
            try:
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue  # another run's clean-up removed it before it was opened: make another
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
        _lock(fd)
        if os.fstat(fd).st_nlink > 0:
            return Path(tmp), fd
        os.close(fd)  # another run's clean-up removed it before it was locked: make another
    raise OSError(errno.EAGAIN, "cannot create a temporary file", str(target))


def _lock(fd: int) -> None:
    """An exclusive ``flock`` (waits); without locks on the filesystem, nothing removes its temporaries."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF)


def _stem(name: str) -> str:
    """The part of an output's name its temporaries carry: short enough for a 255-byte name."""
    while len(name.encode()) > _STEM_BYTES:
        name = name[:-1]
    return name


_STEM_BYTES = 200


def _is_temp_of(name: str, target_name: str, suffixes: tuple[str, ...]) -> bool:
    prefix = f".{_stem(target_name)}."
    return any(name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)
               and _RANDOM_PART.fullmatch(name[len(prefix):-len(suffix)]) for suffix in suffixes)


def remove_stale(target: Path, suffixes: tuple[str, ...] = TEMP_SUFFIXES) -> None:
    """Remove temporaries of ``target`` that a killed earlier run left beside it.

    A temporary is removed only while this call holds its lock, so one that a
    live run is writing is never touched. Names are compared as strings; links
    are never followed.
    """
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        if not _is_temp_of(entry.name, target.name, suffixes):
            continue
        is_dir = entry.is_dir(follow_symlinks=False)
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if is_dir else 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live run's
        _discard(Path(entry.path), fd)


def _discard(path: Path, fd: int | None) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
    if fd is not None:
        os.close(fd)


# -- parents and errors --------------------------------------------------------------------


def make_parents(path: Path) -> list[Path]:
    """Create the missing directories above ``path``; return those created (top first).

    Raises:
        NotADirectoryError: an existing part of the path is not a directory.
    """
    missing = []
    for parent in [path.parent, *path.parent.parents]:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory (a part of the output path)",
                                         str(parent))
            break
        missing.append(parent)
    created = []
    try:
        for parent in reversed(missing):
            parent.mkdir()
            created.append(parent)
    except OSError:
        remove_created(created)
        raise
    return created


def remove_created(created: list[Path]) -> None:
    """Remove directories a failed write created, deepest first, if they are still empty."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            return


@contextmanager
def naming(target: Path, *temps: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no path, or a temporary, as one naming ``target``."""
    try:
        yield
    except OSError as err:
        name = None if err.filename is None else str(err.filename)
        if name is None or _is_temporary_name(name, target, temps):
            lines = str(err).strip().splitlines()
            reason = err.strerror or (lines[0][:300] if lines else type(err).__name__)
            raise OSError(err.errno, reason, str(target)) from err
        raise


def _is_temporary_name(name: str, target: Path, temps: tuple[Path, ...]) -> bool:
    """A path one of ``target``'s temporaries has (or ``mkstemp`` tried to give one)."""
    if any(name.startswith(str(t)) for t in temps):
        return True
    return os.path.basename(name).startswith(f".{_stem(target.name)}.")


def check_output_file(path: Path) -> None:
    """An output file may replace a file (or a link, as a name), never a directory or a device."""
    if path.name in ("", ".", ".."):
        raise BudgetallocError(f"{path}: not a file name")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory (an output file was expected)", str(path))
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise BudgetallocError(f"{path}: is a device, pipe or socket, not a file; refusing to replace it")


def check_distinct(output: Path, /, **inputs: Path | None) -> None:
    """Refuse an output that is one of the command's other paths (``--out`` equal to ``--users``)."""
    for option, path in inputs.items():
        if path is None:
            continue
        same = os.path.abspath(output) == os.path.abspath(path)
        try:
            same = same or (os.path.exists(output) and os.path.samefile(output, path))
        except OSError:
            pass
        if same:
            flag = "--" + option.replace("_", "-")
            raise BudgetallocError(f"{output}: is also given as {flag}; write this output to another path")


def probe_writable(path: str | Path) -> None:
    """Fail now, not after a long computation, if an output cannot be created at ``path``.

    A temporary is created (and removed) in the nearest existing directory above
    ``path``; nothing is left behind.

    Raises:
        OSError: naming ``path`` (read-only, not permitted, a part that is a file).
    """
    path = Path(os.path.abspath(path))
    parent = path.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory (a part of the output path)", str(parent))
    with naming(path):
        tmp, fd = claim_temp(parent / path.name, ".tmp", directory=False)
        _discard(tmp, fd)


# -- atomic writers ------------------------------------------------------------------------


@contextmanager
def _temp_beside(path: Path, *, directory: bool, commit: Callable[[Path], None],
                 shown: Path | None = None) -> Iterator[Path]:
    """Claim a temporary file or directory beside ``path``, yield it, ``commit(tmp)`` on success.

    On any failure the temporary and the parent folders this call created are removed;
    an ``OSError`` names ``shown`` (default ``path``).
    """
    shown = shown or path
    with naming(shown):
        created = make_parents(path)
    tmp, fd = None, None
    try:
        with naming(shown):
            remove_stale(path)
            tmp, fd = claim_temp(path, ".tmp", directory=directory)
            os.fchmod(fd, output_mode(path, directory=directory))
        with naming(shown, tmp):
            yield tmp
            commit(tmp)
    except BaseException:
        if tmp is not None:
            _discard(tmp, fd)
            fd = None
        remove_created(created)
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it into place on success."""
    path = Path(path)
    check_output_file(path)

    def commit(tmp: Path) -> None:
        check_output_file(path)
        os.replace(tmp, path)

    with _temp_beside(path, directory=False, commit=commit) as tmp:
        yield tmp


@contextmanager
def _parent_lock(path: Path) -> Iterator[None]:
    """Serialise swaps into one directory between runs (``flock`` on the directory itself)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _lock(fd)
        yield
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str | Path, *, replaceable: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; swap it into place on success.

    Args:
        path: the directory to write.
        replaceable: called with ``path`` when something is there; raises unless
            that may be replaced. Without it an existing directory is replaced
            (the pipeline's own outputs, which DVC owns), never a file or a link.

    An existing directory at ``path`` is replaced only after the new one is
    complete: under a lock on the parent directory, it is checked again, moved
    aside, and removed after the rename. Concurrent writers: the last one wins.
    """
    path = Path(os.path.abspath(path))
    check = replaceable or _directory_only
    if os.path.lexists(path):
        with _parent_lock(path):  # not while another writer swaps it: the check reads inside it
            if os.path.lexists(path):
                check(path)
    with _temp_beside(path, directory=True, commit=lambda tmp: _swap_directory(tmp, path, check)) as tmp:
        yield tmp


def _directory_only(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        raise BudgetallocError(f"{path}: exists and is not a directory; refusing to replace it")


def _swap_directory(tmp: Path, path: Path, check: Callable[[Path], None]) -> None:
    with _parent_lock(path):
        old, old_fd = None, None
        if os.path.lexists(path):
            check(path)
            old, old_fd = claim_temp(path, ".old", directory=True)
            os.replace(path, old / "previous")
        swapped = False
        try:
            os.replace(tmp, path)
            swapped = True
        except OSError:
            if old is not None:
                os.replace(old / "previous", path)  # put the previous one back
                swapped = True  # nothing of value is left in ``old``
            raise
        finally:
            if old is not None and swapped:
                _discard(old, old_fd)
            elif old is not None:
                os.close(old_fd)  # the previous policy stays in ``old``, for the user to recover


@contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success move each file in it into ``directory``.

    Unlike :func:`atomic_directory` the target may hold other files (``reports/``):
    they are kept, and the new files appear only once all of them are complete.
    A ``directory`` this call created is removed again if the write fails.
    """
    directory = Path(directory)
    if os.path.lexists(directory) and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory (an output directory was expected)",
                                 str(directory))

    def commit(tmp: Path) -> None:
        for item in sorted(tmp.iterdir()):
            target = directory / item.name
            if item.is_file() and target.is_file():
                os.chmod(item, output_mode(target, directory=False))
            os.replace(item, target)
        tmp.rmdir()

    with _temp_beside(directory / "incoming", directory=True, commit=commit, shown=directory) as tmp:
        yield tmp


# -- writers -------------------------------------------------------------------------------


def is_csv_path(path: str | Path) -> bool:
    """Outputs are CSV by suffix, Parquet otherwise."""
    return Path(path).suffix.lower() == ".csv"


#: Rows per Parquet row group of a :class:`TableSink`: pyarrow's default, ``write_table``'s too.
OUTPUT_ROW_GROUP = 1 << 20


class TableSink:
    """Rows appended in memory (``path`` None), to CSV by pandas, or to Parquet in fixed row groups.

    Rows come as frames, or as Arrow tables of one schema. Row groups of
    ``row_group_rows`` rows, each one contiguous table, give the bytes ``write_table``
    gives for the whole table at that row group size; CSV the bytes of ``DataFrame.to_csv``.
    Not atomic: :func:`table_sinks` gives it a temporary and the format of its output.
    """

    def __init__(self, path: Path | None, row_group_rows: int = OUTPUT_ROW_GROUP, *,
                 csv: bool = False) -> None:
        self.path, self.rows, self.pending, self.held, self.out = path, row_group_rows, [], 0, None
        self.csv, self.frame = csv, None

    def write(self, rows: pd.DataFrame | pa.Table) -> None:
        if self.path is None or self.csv:
            if self.csv:
                rows = rows.to_pandas() if isinstance(rows, pa.Table) else rows
                self.out = self.out or open(self.path, "w", newline="")  # noqa: SIM115 - closed in close()
                rows.to_csv(self.out, header=self.out.tell() == 0, index=False)
            else:
                self.pending.append(rows)
            return
        self.pending.append(rows if isinstance(rows, pa.Table) else pa.Table.from_pandas(rows, preserve_index=False))
        self.held += len(rows)
        if self.held >= self.rows:
            self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        pending = pa.concat_tables(self.pending)
        whole = pending.num_rows if final else pending.num_rows - pending.num_rows % self.rows
        rest = pending.slice(whole)  # views of the last pieces only: the others are let go once copied
        table = pending.slice(0, whole).combine_chunks()
        del pending
        self.pending, self.held = ([rest] if rest.num_rows else []), rest.num_rows
        self.out = self.out or pq.ParquetWriter(self.path, table.schema)
        self.out.write_table(table, row_group_size=self.rows)

    def close(self, *, complete: bool) -> None:
        """Write what is pending (``complete``) and close; in memory, keep the rows as ``frame``."""
        if self.path is None:
            if complete:
                one = len(self.pending) == 1
                self.frame = self.pending[0] if one else pd.concat(self.pending, ignore_index=True)
            return
        if complete and self.pending and not self.csv:
            self.flush(final=True)
        if self.out is not None:
            self.out.close()


@contextmanager
def table_sinks(*outs: str | Path | None,
                rows: int = OUTPUT_ROW_GROUP) -> Iterator[tuple[TableSink, ...]]:
    """A :class:`TableSink` per output (None: in memory), all in place once the block ends.

    Each format follows its output's suffix (CSV for ``.csv``, Parquet otherwise),
    not its temporary's. Every sink is closed before the first rename; on an error
    nothing is written.
    """
    with ExitStack() as stack:
        temps = [None if out is None else stack.enter_context(atomic_path(out)) for out in outs]
        sinks = tuple(TableSink(tmp, rows, csv=tmp is not None and is_csv_path(out))
                      for tmp, out in zip(temps, outs))
        try:
            yield sinks
        except BaseException:
            for sink in sinks:
                sink.close(complete=False)
            raise
        for sink in sinks:
            sink.close(complete=True)


def write_tables(frames: dict[Path, pd.DataFrame]) -> None:
    """Write tables (Parquet, or CSV by suffix; no index) so that all appear or none.

    Each is renamed into place only once all are written.
    """
    with ExitStack() as stack:
        for path, df in frames.items():
            tmp = stack.enter_context(atomic_path(path))
            if is_csv_path(path):
                df.to_csv(tmp, index=False)
            else:
                pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` atomically as Parquet, or CSV when the suffix is ``.csv``."""
    write_tables({path: df})


def json_text(obj) -> str:
    """``obj`` as the project writes JSON: indented, keys sorted, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(obj, path: str | Path) -> None:
    """Write ``obj`` as :func:`json_text` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))
