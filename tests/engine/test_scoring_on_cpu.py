"""engine.scoring: the teacher's one-pass scores of given responses equal a full forward per row in float64."""

import pytest
import torch

from recipe.optimal_sampling.engine.scoring import teacher_logprobs
from tests.tiny_models import tiny_qwen3


def reference(model, prompt: list[int], response: list[int], temperature: float, vocab: int) -> list[float]:
    """Full forward of prompt + response on a float64 copy, log_softmax over every position, one row at a time."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :, :vocab] / temperature  # (L, V)
    logp = logits.log_softmax(-1)  # (L, V)
    return [float(logp[len(prompt) - 1 + t, y]) for t, y in enumerate(response)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [3, 1024])
def test_scores_equal_a_float64_full_forward_per_row(temperature, chunk_tokens):
    model = tiny_qwen3(1, vocab_size=40, sharpness=4.0)
    model64 = tiny_qwen3(1, vocab_size=40, sharpness=4.0).double()
    g = torch.Generator().manual_seed(0)
    prompts = [[int(x) for x in torch.randint(2, 40, (n,), generator=g)] for n in (3, 1, 6, 2)]
    responses = [[int(x) for x in torch.randint(2, 40, (n,), generator=g)] for n in (5, 2, 1, 7)]
    got = teacher_logprobs(model, prompts, responses, temperature, chunk_tokens=chunk_tokens)
    assert [len(r) for r in got] == [len(r) for r in responses]
    for row, p, r in zip(got, prompts, responses, strict=True):
        want = reference(model64, p, r, temperature, 40)
        torch.testing.assert_close(
            torch.tensor(row, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), atol=2e-5, rtol=0
        )


def test_a_padded_vocabulary_is_cut_to_the_shared_one_and_empty_responses_give_empty_rows():
    model = tiny_qwen3(2, vocab_size=48, sharpness=4.0)  # 48 embedding rows, 40 real tokens
    model64 = tiny_qwen3(2, vocab_size=48, sharpness=4.0).double()
    got = teacher_logprobs(model, [[5, 6], [7]], [[8, 9, 10], []], vocab_size=40)
    assert got[1] == []
    torch.testing.assert_close(
        torch.tensor(got[0], dtype=torch.float64),
        torch.tensor(reference(model64, [5, 6], [8, 9, 10], 1.0, 40), dtype=torch.float64),
        atol=2e-5,
        rtol=0,
    )
