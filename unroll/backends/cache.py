"""The on-disk cache of generated modules: atomic writes, validated loads, one compile per entry.

Both compiled targets turn a graph into Python source and let Numba compile it with `cache=True`,
which needs a real file. An entry is a module `<prefix><sha256 of its text>.py` in the cache
directory ($UNROLL_CACHE_DIR, else ~/.cache/unroll), plus what Numba writes beside it
(`__pycache__/*.nbi|nbc`, or under $NUMBA_CACHE_DIR) and, for the CPU target, a small JSON record.

What the cache promises, and how:
- writes are atomic: a temporary file in the same directory, fsync'd, then `os.replace`; a
  killed writer leaves at most a `*.tmp` file, which `clear` removes;
- an entry is validated when loaded: a module file must hold exactly the text its name hashes
  (so a truncated or foreign file is caught); a damaged one is reported in one warning line and
  rewritten; a Numba cache file that fails to load (`UnpicklingError` from garbage) is reported,
  dropped and rebuilt by compiling again (`compile_once`);
- concurrent compiles of one entry, from threads or processes, all succeed and compile once:
  `entry_lock` holds a per-entry thread lock and an `flock` on `<entry>.lock`, so a second
  process waits and then loads Numba's cache; a module becomes visible to other threads only
  after it has fully loaded;
- an unwritable or full cache directory is reported once and the entry is compiled in memory
  (`cache=False`), which costs a compile per process but never fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import types
import warnings
from typing import Any, Callable, Iterator

CACHE_ENV = "UNROLL_CACHE_DIR"
PREFIXES = ("unroll_gen_", "unroll_graph_", "unroll_cuda_", "unroll_native_")


class CacheWarning(UserWarning):
    """Something in the cache was damaged or unusable; the cache worked around it."""


def default_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "unroll")


def digest(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:24]


def warn(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)


def write_atomic(path: str, text: str | bytes) -> None:
    """Write `text` (or bytes) to `path` so that readers see the old file or the whole new one."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- locks -----------------------------------------------------------------------------------------

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_GUARD = threading.Lock()


@contextlib.contextmanager
def entry_lock(directory: str, name: str) -> Iterator[None]:
    """Exclusive use of one entry, across the threads of this process and across processes."""
    with _GUARD:
        lock = _THREAD_LOCKS.setdefault(os.path.join(directory, name), threading.Lock())
    with lock:
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(os.path.join(directory, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # read-only cache: no other process can write this entry either
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


# ---- modules ---------------------------------------------------------------------------------------

_MODULES: dict[str, types.ModuleType] = {}
_WARNED_DIRS: set[str] = set()


def module_name(prefix: str, text: str) -> str:
    return prefix + digest(text)


def load_module(prefix: str, text: str, directory: str | None = None) -> tuple[types.ModuleType, str, str]:
    """The module holding exactly `text`: (module, path, how) with how "reused" (loaded before in
    this process), "loaded" (imported from its file) or "in_memory". Writes the file once,
    validates an existing one, and falls back to memory where the directory is unwritable.
    Call it under `entry_lock` when a compile follows, so that only one caller compiles."""
    directory = directory or default_dir()
    name = module_name(prefix, text)
    path = os.path.join(directory, name + ".py")
    module = _MODULES.get(name)
    if module is not None:
        return module, path, "reused"
    try:
        _ensure_file(path, text)
    except OSError as err:
        if directory not in _WARNED_DIRS:
            _WARNED_DIRS.add(directory)
            warn(f"unroll: cache directory {directory} is not writable ({err.strerror}); compiling in "
                 f"memory, so nothing is reused by the next process (set {CACHE_ENV})")
        module = _in_memory(name, text)
        _MODULES[name] = module
        return module, path, "in_memory"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # Numba resolves the function's module while compiling it
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _MODULES[name] = module  # published only once loaded: other threads never see half a module
    return module, path, "loaded"


def read_module(path: str) -> str | None:
    """The text of a cached module file whose content matches its name, else None (a damaged
    or foreign file is reported and removed)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    name = os.path.basename(path)[:-3]
    if not any(name == p + digest(data) for p in PREFIXES):
        warn(f"unroll: damaged cache entry {path} (content does not match its name); rebuilding it")
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    return data.decode()


def _ensure_file(path: str, text: str) -> None:
    try:
        with open(path) as f:
            if f.read() == text:
                return
        warn(f"unroll: damaged cache entry {path} (content does not match its name); rebuilt it")
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError):
        warn(f"unroll: unreadable cache entry {path}; rebuilt it")
    write_atomic(path, text)


def _in_memory(name: str, text: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = ""
    code = compile(text.replace("cache=True", "cache=False"), f"<unroll generated {name}>", "exec")
    exec(code, module.__dict__)  # noqa: S102 - our own generated source
    return module


# ---- compiling with Numba's cache ------------------------------------------------------------------

def compile_once(compile_fn: Callable[[], Any], dispatcher: Any, where: str) -> Any:
    """`compile_fn()`, retried once after dropping the dispatcher's Numba cache index when loading
    it failed (garbage in an index or data file raises while unpickling)."""
    try:
        return compile_fn()
    except Exception:
        cache = getattr(dispatcher, "_cache", None)
        index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
        if cache is None or index is None or not os.path.exists(index):
            raise
        warn(f"unroll: damaged Numba cache for {where} ({index}); rebuilding it")
        with contextlib.suppress(OSError):
            cache.flush()  # an empty index: the next save writes fresh data files
        return compile_fn()


# ---- inspection -----------------------------------------------------------------------------------

def entries(directory: str | None = None) -> list[str]:
    """Every file under the cache directory that belongs to unroll or to Numba's cache of it."""
    directory = directory or default_dir()
    found = []
    for root, _, files in os.walk(directory):
        for f in files:
            if f.startswith(PREFIXES) or f.endswith((".nbi", ".nbc", ".tmp", ".lock")):
                found.append(os.path.join(root, f))
    return sorted(found)


def summary(directory: str | None = None) -> dict[str, Any]:
    directory = directory or default_dir()
    files = entries(directory)
    return {"directory": directory, "files": len(files),
            "modules": sum(os.path.basename(f).endswith((".py", ".o")) for f in files),
            "bytes": sum(os.path.getsize(f) for f in files if os.path.exists(f)),
            "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR") or "beside the modules (__pycache__)"}


def clear(directory: str | None = None) -> int:
    """Remove every cache file of unroll's (modules, records, Numba's files, temporaries)."""
    removed = 0
    for path in entries(directory):
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed += 1
    _MODULES.clear()
    return removed
