"""No drafting: every step verifies the root alone, i.e. plain greedy decoding."""

from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.tree import TokenTree


class VanillaDrafter(Drafter):
    name = "vanilla"
    drafts = False

    def propose(self, request: DraftRequest) -> TokenTree:
        return TokenTree()
