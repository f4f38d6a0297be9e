"""Compatibility module: checkpoint I/O lives in `mxmoe.checkpoints` (one module per format);
the names that were importable from here still are."""

from .checkpoints import *  # noqa: F401,F403
from .checkpoints import CONFIG_KEYS, NAMINGS, read_spec  # noqa: F401
from .checkpoints.files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, _open, _read_json  # noqa: F401
from .checkpoints.gpt_oss import GptOssMoESpec, _check_slice, _load  # noqa: F401
from .checkpoints.ranks import _group_position  # noqa: F401
