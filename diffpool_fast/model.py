"""Old module path, kept as a re-export: the models live in :mod:`diffpool_fast.nn.model`."""
from .nn.model import *  # noqa: F401,F403
from .nn.model import __all__  # noqa: F401
