"""Save and load named parameter arrays as .npz files (no pickles, names kept exactly).

The file is a standard .npz (a zip of .npy files, readable by `np.load`), written to exactly the
given path (no ".npz" is appended) through a temporary file and `os.replace`, so a crash never leaves
half a checkpoint. A temporary is removed when the save fails; one left by a killed process (its
name carries the writer's pid) is removed by the next save into the same directory. Names may hold dots ("lstm.weight_ih_l0") or any other character except "/",
and order is preserved. Loading uses `allow_pickle=False`: an entry holding Python objects is refused.

A training checkpoint (`save_checkpoint`, what `TrainStep.save_checkpoint` writes) is such a file
with prefixed names: "param:NAME" for each value, "optim:NAME:KEY" for the optimizer's state and
"steps" for the update count. Nothing in it depends on the number of processes that wrote it.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Mapping

import numpy as np


def save_params(path: str | os.PathLike[str], params: Mapping[str, np.ndarray]) -> None:
    """Write `{name: array}` to an .npz file at `path`."""
    arrays = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise ValueError(f"save_params: names must be non-empty strings without '/' or '\\', "
                             f"found {name!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise ValueError(f"save_params: {name!r} holds Python objects (dtype {arr.dtype}); only "
                             f"numeric arrays can be saved")
        arrays[name] = arr
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    _remove_orphans(directory)
    fd, tmp = tempfile.mkstemp(prefix=f".params-{os.getpid()}-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _remove_orphans(directory: str) -> None:
    """Delete temporaries of saves whose writing process no longer exists (killed mid-save)."""
    for name in os.listdir(directory):
        if not (name.startswith(".params-") and name.endswith(".npz.tmp")):
            continue
        pid = name[len(".params-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def load_params(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an .npz file into `{name: array}` in file order. Refuses pickled (object) entries."""
    loaded = np.load(os.fspath(path), allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"load_params: {os.fspath(path)!r} is a single .npy array, expected an .npz "
                         f"archive of named arrays")
    with loaded as npz:
        out = {}
        for name in npz.files:
            try:
                out[name] = npz[name]
            except ValueError as err:
                raise ValueError(f"load_params: entry {name!r} of {os.fspath(path)!r} holds pickled "
                                 f"Python objects; refusing to load it (allow_pickle=False)") from err
        return out


PARAM, OPTIM, STEPS = "param:", "optim:", "steps"


def save_checkpoint(path: str | os.PathLike[str], values: Mapping[str, np.ndarray],
                    optimizer_state: Mapping[str, np.ndarray], steps: int) -> None:
    """Write parameter values, an optimizer's `state_dict()` and the step count to one .npz."""
    arrays = {PARAM + name: value for name, value in values.items()}
    arrays.update({OPTIM + key: value for key, value in optimizer_state.items()})
    arrays[STEPS] = np.asarray(steps, dtype=np.int64)
    save_params(path, arrays)


def checkpoint_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A checkpoint's entries as stored (load_params, after checking it is a checkpoint)."""
    flat = load_params(path)
    if STEPS not in flat:
        raise ValueError(f"load_checkpoint: {os.fspath(path)!r} is not a training checkpoint (no "
                         f"{STEPS!r} entry); a file of parameters alone loads with load_params")
    return flat


def split_checkpoint(flat: Mapping[str, np.ndarray], path: str | os.PathLike[str] = "checkpoint"
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(values, optimizer state, steps) from a checkpoint's entries."""
    values = {k[len(PARAM):]: np.asarray(v) for k, v in flat.items() if k.startswith(PARAM)}
    optimizer = {k[len(OPTIM):]: np.asarray(v) for k, v in flat.items() if k.startswith(OPTIM)}
    other = [k for k in flat if not k.startswith((PARAM, OPTIM)) and k != STEPS]
    if other or STEPS not in flat:
        why = f"unexpected entries {other[:3]}" if other else f"no {STEPS!r} entry"
        raise ValueError(f"load_checkpoint: {os.fspath(path)!r} is not a training checkpoint ({why})")
    return values, optimizer, int(flat[STEPS])


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(values, optimizer state, steps) from a file written by `save_checkpoint`."""
    return split_checkpoint(checkpoint_arrays(path), path)
