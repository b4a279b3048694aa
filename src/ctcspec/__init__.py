"""ctcspec: lossless speculative decoding for Hugging Face causal LMs.

Read the decoding loop in this order: drafters/ (draft; the networks they run are in
modules/, the ways their nodes are ranked in search.py) -> tree.py (token tree) -> verify.py
(one base forward over the tree) -> decoding.py (how generate picks each token: processors, argmax
or sampling, stopping criteria) -> accept.py (walk the tree as the base model decodes it) -> engine.py
(the loop that ties them together; custom_generate.py runs it inside model.generate); batch.py runs many
sequences at once on batch_cache.py's shared cache.
pricing.py is the tree-size rule, budget.py measures what it rests on, assembly.py puts an engine together
(`build_engine`: what the CLI, the server and custom_generate call); training/ makes drafters, bench/ measures them.
"""

from ctcspec.assembly import build_batch_engine, build_engine
from ctcspec.batch import BatchEngine
from ctcspec.custom_generate import speculative_generate
from ctcspec.decoding import Decoding, decoding_for
from ctcspec.engine import GenerationResult, GenerationStats, SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.tree import TokenTree

__all__ = ["BatchEngine", "CtcspecError", "Decoding", "GenerationResult", "GenerationStats", "SpeculativeEngine",
           "TokenTree", "build_batch_engine", "build_engine", "decoding_for", "speculative_generate"]
__version__ = "0.1.0"
