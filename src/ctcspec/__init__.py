"""ctcspec: lossless speculative decoding for Hugging Face causal LMs.

Read the decoding loop in this order: drafters/ (draft; the networks they run are in
modules/, the ways their nodes are ranked in search.py) -> tree.py (token tree) -> verify.py
(one base forward over the tree) -> accept.py (longest greedy path, KV-cache compaction)
-> engine.py (the loop that ties them together). budget.py picks the tree size for this
machine; training/ makes drafters, bench/ measures them.
"""

from ctcspec.engine import GenerationResult, GenerationStats, SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.tree import TokenTree

__all__ = ["CtcspecError", "GenerationResult", "GenerationStats", "SpeculativeEngine", "TokenTree"]
__version__ = "0.1.0"
