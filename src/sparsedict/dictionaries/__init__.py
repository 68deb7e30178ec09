"""Dictionary architectures. Importing this package registers every architecture.

Adding one: a module here with ``@register("name", NameConfig)`` on a :class:`Dictionary` subclass, its
capabilities declared on the class, plus one import line below (ARCHITECTURE.md lists the steps).
"""

from sparsedict.dictionaries import (
    batchtopk,  # noqa: F401  (registers)
    clt,  # noqa: F401  (registers)
    gated,  # noqa: F401  (registers)
    jumprelu,  # noqa: F401  (registers)
    matryoshka,  # noqa: F401  (registers)
    mp,  # noqa: F401  (registers)
    relu,  # noqa: F401  (registers)
    snmf,  # noqa: F401  (registers)
    topk,  # noqa: F401  (registers)
)
from sparsedict.dictionaries.attach import Attachment, LayeredAttachment, reconstruct
from sparsedict.dictionaries.base import (
    ARCHITECTURES,
    Dictionary,
    DictionaryConfig,
    Output,
    SparseCode,
    available,
    build,
    from_pretrained,
    lookup,
    register,
    save_pretrained,
)
from sparsedict.dictionaries.clt import CLT, CLTConfig
from sparsedict.dictionaries.transcoder_set import TranscoderSet

__all__ = [
    "ARCHITECTURES", "CLT", "Attachment", "CLTConfig", "Dictionary", "DictionaryConfig", "LayeredAttachment",
    "Output", "SparseCode", "TranscoderSet", "available", "build", "from_pretrained", "lookup", "reconstruct",
    "register", "save_pretrained",
]  # fmt: skip
