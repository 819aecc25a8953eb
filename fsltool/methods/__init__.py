"""Meta-learning methods: one file each, registered by name (importing this package registers them all)."""

from fsltool.methods import protonet  # noqa: F401  (registers "protonet")
from fsltool.methods import matchingnet  # noqa: F401  (registers "matchingnet")
from fsltool.methods import relationnet  # noqa: F401  (registers "relationnet")
from fsltool.methods import maml  # noqa: F401  (registers "maml")
from fsltool.methods import reptile  # noqa: F401  (registers "reptile")
from fsltool.methods import mann  # noqa: F401  (registers "mann")
from fsltool.methods import snail  # noqa: F401  (registers "snail")
from fsltool.methods import baseline  # noqa: F401  (registers "baseline" and "baseline++")
from fsltool.methods import logistic  # noqa: F401  (registers "logistic")
from fsltool.methods import ridge  # noqa: F401  (registers "ridge")
from fsltool.methods import svm  # noqa: F401  (registers "svm")
from fsltool.methods.base import METHODS, Method, build_method, get_method, method_options

__all__ = ["METHODS", "Method", "build_method", "get_method", "method_options"]
