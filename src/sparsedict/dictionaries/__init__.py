"""Dictionary architectures. Importing this package registers every architecture.

Adding one: a module here with ``@register("name", NameConfig)`` on a :class:`Dictionary` subclass,
plus one import line below.
"""

from sparsedict.dictionaries import (
    batchtopk,  # noqa: F401  (registers)
    gated,  # noqa: F401  (registers)
    jumprelu,  # noqa: F401  (registers)
    matryoshka,  # noqa: F401  (registers)
    mp,  # noqa: F401  (registers)
    relu,  # noqa: F401  (registers)
    snmf,  # noqa: F401  (registers)
    topk,  # noqa: F401  (registers)
)
from sparsedict.dictionaries.base import (
    Dictionary,
    DictionaryConfig,
    Output,
    SparseCode,
    available,
    build,
    lookup,
    register,
)

__all__ = ["Dictionary", "DictionaryConfig", "Output", "SparseCode", "available", "build", "lookup", "register"]
