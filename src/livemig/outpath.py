"""Where a machine process may write a file asked for by a control client (`save path=`).

The policy: an absolute path only (relative to what? the client's directory is not ours); never
an existing file; the file is written under a temporary name in the same directory and linked
into place with link(2), which fails rather than replace a file that appeared meanwhile (O_EXCL
semantics). The process writes only where its own user may, and since the control socket admits
only that same user, a client can make it write nowhere the client could not write itself.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


class OutputPathError(Exception):
    """The path cannot be written under the policy above; the message (one line) does not
    repeat the path: the caller says which."""


@contextlib.contextmanager
def claim_output_path(path: str) -> Iterator[str]:
    """Check `path`, then yield a temporary path (a new empty file, mode 0600) in the same
    directory to write to; on a normal exit it is linked to `path`, never over an existing
    file, and removed; on an error it is removed and `path` is untouched."""
    if not isinstance(path, str) or not path:
        raise OutputPathError("needs a path")
    if not os.path.isabs(path):
        raise OutputPathError("not an absolute path (relative to what? the machine process "
                              "does not know the client's directory)")
    if path.endswith("/"):
        raise OutputPathError("names a directory, not a file")
    if os.path.lexists(path):
        raise OutputPathError("the file exists; livemig does not overwrite files")
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        raise OutputPathError(f"directory {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise OutputPathError(f"cannot write in {folder}: {e.strerror or e}") from e
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o600)  # the writer may have replaced our file with one of its own
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputPathError("the file appeared while it was being written; livemig "
                                  "does not overwrite files") from None
        except OSError as e:
            raise OutputPathError(f"cannot create it: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
