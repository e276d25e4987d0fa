"""Atomic writes live with the board runtime (device/fileio.py); re-exported for the compiler."""
from device.fileio import atomic_path, ensure_writable_dir  # noqa: F401
