"""N-gram speculation inside continuous batching: each decoding sequence may carry a draft found by prompt
lookup (generate()'s `prompt_lookup_num_tokens` drafter) in its own tokens; the scheduler gives the row
`1 + draft` tokens, the runner computes them with the step's one forward (as a prefill chunk over the
sequence's blocks), and the engine keeps the draft while each position's sample agrees with it.

Per sequence a `SpeculationControl` adapts the draft length and pauses where the acceptance does not pay; with
`_MAX_SPECULATING_ROWS` or more sequences running, the batch already fills each pass over the weights and
nobody drafts. Rows with structured output never draft.
"""

from __future__ import annotations

import torch

from qwen2.generation.draft import PromptLookupDrafter
from qwen2.generation.speculative import SpeculationControl
from qwen2.serving.sequence import Sequence

_MAX_SPECULATING_ROWS = 8


class NgramSpeculation:
    def __init__(self, num_tokens: int, max_ngram: int = 2) -> None:
        self.num_tokens = num_tokens
        self.drafter = PromptLookupDrafter(max_ngram, None)
        self.drafted = 0
        self.accepted = 0

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Set the draft of each running sequence about to decode one token."""
        if len(running) >= _MAX_SPECULATING_ROWS:
            return
        for seq in running:
            if seq.num_uncomputed_tokens != 1 or not seq.num_computed_tokens or seq.constraint is not None:
                continue  # a constrained row's every token is masked by its grammar: it decodes plainly
            if seq.speculation is None:
                seq.speculation = SpeculationControl(self.num_tokens)
            room = min(max_model_len - seq.num_tokens, (seq.params.max_tokens or max_model_len)
                       - seq.num_output_tokens) - 1  # the verification yields one token past the draft
            want = min(seq.speculation.draft_length(), room)
            if want > 0:
                draft, _ = self.drafter.propose(torch.tensor(seq.token_ids), want)
                seq.draft = draft.tolist()
            if not seq.draft:
                seq.speculation.plain_step()

    def verified(self, seq: Sequence, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        seq.speculation.verified(drafted, accepted)
