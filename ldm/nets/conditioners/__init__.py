"""Condition encoders and the Conditioner that runs them (see `base` for the embedder contract).

A new kind of condition is one file with an `Embedder` subclass plus one `conf/cond/*.yaml` that lists it.
"""

from ldm.nets.conditioners.base import Embedder, ExampleRequest
from ldm.nets.conditioners.class_label import ClassEmbedder
from ldm.nets.conditioners.concat import ConcatConditioner
from ldm.nets.conditioners.conditioner import Conditioner
from ldm.nets.conditioners.text import FrozenTextEncoder, embedded_minilm_path

__all__ = ["ClassEmbedder", "ConcatConditioner", "Conditioner", "Embedder", "ExampleRequest", "FrozenTextEncoder",
           "embedded_minilm_path"]
