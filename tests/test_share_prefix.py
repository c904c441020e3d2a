"""`train.share_prefix`: a preference pair run as one sequence, its common prefix once, scores as the padded
pair batch does (log-probs, loss, gradients), with the layout and mask worked by hand. (A ZeRO-3 step with shared prefixes is in test_train_memory, beside the other DeepSpeed steps.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypipe.config import ConfigError
from raypipe.train.collate import CHOSEN, PREFIX, REJECTED, pad_sequences, share_prefix_layout
from raypipe.train.logprobs import TokenLogProbs
from raypipe.train.losses import sequence_logps
from raypipe.train.objectives import PreferenceObjective
from tests.test_train_memory import _assert_close_grads, _grads, _step_pairs


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk", [0, 16])
def test_shared_prefix_scores_pairs_as_unshared(tiny_model_dir: Path, tok, attention: str, chunk: int) -> None:
    """Each pair run as one sequence with its common prefix once: the same per-token log-probs, preference loss
    and gradients as the padded pair batch, on fewer tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64,
                                                 attn_implementation=attention)
    pairs = _step_pairs(tok)
    seqs, masks = [p[0] for p in pairs] + [p[2] for p in pairs], [p[1] for p in pairs] + [p[3] for p in pairs]
    ids, attn, mask = pad_sequences(seqs, masks, tok.pad_token_id)
    ran: list[int] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: ran.append(kwargs["input_ids"].numel()), with_kwargs=True)
    results = []
    for share in (False, True):
        path = TokenLogProbs(model, chunk, share_prefix=share)
        logps = path(input_ids=ids, attention_mask=attn, loss_mask=mask, pairs=True)
        (sequence_logps(logps, mask) * torch.arange(1.0, len(seqs) + 1, dtype=logps.dtype)).sum().backward()
        results.append((logps.detach(), _grads(model)))
    hook.remove()
    assert ran[1] < 0.7 * ran[0], ran
    # Llama's RMSNorm (and eager attention's softmax) run in fp32 even in an fp64 model: eager's softmax now sums
    # each row over more masked keys, and a prefix state's gradient sums both sides before the cast instead of
    # after it, which moves log-probs and gradients by a few 1e-8 (letting a rejected token see the chosen ones
    # moves them by 1e-2)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-7, atol=1e-7)
    _assert_close_grads(results[1][1], results[0][1], 1e-6)

    objective = PreferenceObjective("sigmoid", beta=0.1, nll_weight=0.5)
    batch = [(*p, -20.0 - k, -21.0 - k) for k, p in enumerate(pairs)]
    losses = [objective.step(TokenLogProbs(model, chunk, share_prefix=share), batch, tok.pad_token_id)[0]
              for share in (False, True)]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-8)


def test_shared_prefix_layout_keeps_rejected_tokens_from_the_chosen_ones() -> None:
    """Pair (1 2 3 4, 1 2 5): prefix 1 2 once, chosen 3 4 at positions 2-3, rejected 5 at position 2; 5 sees
    the prefix and itself, not 3 or 4."""
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]])
    layout = share_prefix_layout(ids, (ids > 0).long(), torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]]))
    assert layout.ids.tolist() == [[1, 2, 3, 4, 5]] and layout.positions.tolist() == [[0, 1, 2, 3, 2]]
    assert layout.branch.tolist() == [[PREFIX, PREFIX, CHOSEN, CHOSEN, REJECTED]]
    allowed = layout.attention_mask("bool", torch.float32)[0, 0]
    assert allowed[4].tolist() == [True, True, False, False, True]
    assert allowed[3].tolist() == [True, True, True, True, False]
    # chosen's 3 and 4 read states 1 and 2; rejected's 5 reads state 1, the prefix's end
    assert layout.sources[1].tolist() == [1, 2, 1] and layout.targets.tolist() == [3, 4, 5]
    assert [r.tolist() for r in layout.rows] == [[0, 0, 1], [1, 2, 1]]
    additive = layout.attention_mask("additive", torch.float32)[0, 0]
    assert additive[4, 2] == torch.finfo(torch.float32).min and additive[4, 1] == 0


def test_shared_prefix_needs_an_attention_that_takes_a_mask(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="share_prefix"):
        TokenLogProbs(model, 16, share_prefix=True)
