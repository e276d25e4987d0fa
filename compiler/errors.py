"""The error type and CLI wrapper live with the board runtime (device/errors.py), which cannot
import the compiler; re-exported here for the compiler's commands."""
from device.errors import UserError, cli  # noqa: F401
