"""The sampled softmax estimates the full softmax's loss and gradient; the full one stays the reference."""

import pytest
import torch

from charrnn.ops.sampled_softmax import PROPOSALS, full_softmax_loss, sampled_softmax_loss


def _problem(v=400, h=16, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = (1e4 / torch.arange(1, v + 1).double()).round()          # Zipfian token counts
    targets = torch.multinomial(counts.float(), n, replacement=True, generator=g)
    weight = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    bias = torch.log(counts.float() / counts.sum()).requires_grad_()  # a head that learned the unigram
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    return counts, targets, weight, bias, hidden


def _grads(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("proposal", sorted(PROPOSALS))
def test_the_mean_sampled_gradient_points_where_the_full_softmax_gradient_does(proposal):
    counts, targets, weight, bias, hidden = _problem()
    params = [weight, bias, hidden]
    full = _grads(full_softmax_loss(hidden, weight, bias, targets), params)
    q = PROPOSALS[proposal](counts)
    g = torch.Generator().manual_seed(1)
    mean = sum(_grads(sampled_softmax_loss(hidden, weight, bias, targets, q, 64, g), params) for _ in range(50)) / 50
    assert torch.nn.functional.cosine_similarity(mean, full, dim=0) > 0.9
    # and a single draw already points the same way
    one = _grads(sampled_softmax_loss(hidden, weight, bias, targets, q, 64, g), params)
    assert torch.nn.functional.cosine_similarity(one, full, dim=0) > 0.5


def test_with_many_samples_one_draw_gives_nearly_the_full_gradient():
    """The loss value carries the -log(K q) corrections (not comparable to the full loss); its gradient is."""
    counts, targets, weight, bias, hidden = _problem(v=50)
    params = [weight, bias, hidden]
    full = _grads(full_softmax_loss(hidden, weight, bias, targets), params)
    q = PROPOSALS["unigram"](counts)
    one = _grads(sampled_softmax_loss(hidden, weight, bias, targets, q, 5000, torch.Generator().manual_seed(2)), params)
    assert torch.nn.functional.cosine_similarity(one, full, dim=0) > 0.99


def test_accidental_hits_are_masked_and_proposals_are_distributions():
    counts = torch.tensor([5.0, 0.0, 1.0])
    for make in PROPOSALS.values():
        q = make(counts)
        assert torch.all(q > 0) and abs(q.sum().item() - 1) < 1e-6
    assert PROPOSALS["log-uniform"](counts).argmax() == 0
    weight, bias = torch.zeros(3, 2), torch.zeros(3)
    hidden, targets = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    only_target = torch.tensor([1.0, 0.0, 0.0])      # every negative is the true token: all masked, loss 0
    loss = sampled_softmax_loss(hidden, weight, bias, targets, only_target + 1e-30, 8)
    assert loss.item() == pytest.approx(0.0)
