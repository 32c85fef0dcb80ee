"""Atomic output directories: a write either completes at its destination or leaves no trace."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def atomic_dir(dst: str, *, overwrite: bool, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` into a fresh sibling temporary directory, then rename it to `dst`.

    An interrupted or failing write leaves `dst` untouched (the temporary directory is
    removed on failure). With `overwrite`, an existing `dst` is replaced only after the
    new one is complete.
    """
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"destination already exists: {dst} (pass --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        out = os.path.join(tmp_root, "out")
        write(out)
        if os.path.exists(dst):
            old = tmp_root + "-old"
            os.rename(dst, old)
            os.rename(out, dst)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:  # a regular file or a symlink: removed itself (the link's target is kept)
                os.remove(old)
        else:
            os.rename(out, dst)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
