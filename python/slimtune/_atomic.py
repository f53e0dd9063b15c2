"""Writing a directory of files so that readers see either the old set or the new set, never a mix.

The files are written into a fresh temporary directory beside the target, which then takes the
target's place by renames on the same filesystem. Files in an existing target that this write
does not produce (a README, a tokenizer) are carried over. A failure while writing removes the
temporary directory and leaves the target as it was.
"""

import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Callable


def default_mode(directory: bool) -> int:
    """The permissions a plain mkdir/open would give (temporary files are created private)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_dir_atomic(target: Path, write: Callable[[Path], None], what: str = "target") -> Path:
    """``write(tmp)`` fills a temporary directory; it then replaces ``target`` as a whole.
    ``what`` names the argument in errors."""
    target = Path(target)
    try:  # one stat: a concurrent writer may be swapping a directory in between two checks
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISDIR(mode):
        raise ValueError(f"{what}: {str(target)!r} exists and is not a directory")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        write(tmp)
        for _ in range(100):  # another writer may swap the same target in between: try again
            if target.is_dir():
                try:
                    for entry in target.iterdir():
                        if not (tmp / entry.name).exists() and not entry.name.startswith(f".{target.name}."):
                            dest = tmp / entry.name
                            if entry.is_dir() and not entry.is_symlink():
                                shutil.copytree(entry, dest, symlinks=True)
                            else:
                                shutil.copy2(entry, dest, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # another writer moved the target away meanwhile: look again
                old = parent / f".{target.name}.old-{uuid.uuid4().hex}"
                try:
                    os.rename(target, old)
                except FileNotFoundError:
                    continue
                try:
                    os.rename(tmp, target)
                except OSError:
                    # Another writer's directory took the place meanwhile: the moved-aside one is stale.
                    try:
                        os.rename(old, target)
                    except OSError:
                        shutil.rmtree(old, ignore_errors=True)
                    continue
                shutil.rmtree(old, ignore_errors=True)
                return target
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                continue
        raise OSError(f"could not replace {str(target)!r}: it keeps changing under concurrent writers")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
