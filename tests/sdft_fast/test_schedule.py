"""The plan of a run: the learning-rate schedule and the resumable data order."""

import pytest

from sdft_fast.schedule import DataCursor, cosine_with_warmup


def test_cosine_schedule_with_warmup():
    kwargs = dict(warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert cosine_with_warmup(0, **kwargs) == pytest.approx(1 / 3)
    assert cosine_with_warmup(1, **kwargs) == pytest.approx(2 / 3)
    assert cosine_with_warmup(2, **kwargs) == pytest.approx(1.0)
    assert cosine_with_warmup(6, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_with_warmup(10, **kwargs) == pytest.approx(0.1)


def test_data_cursor_resumes_from_two_integers_and_crosses_epochs():
    cursor = DataCursor(5, seed=3, shuffle=True)
    first = cursor.take(7)  # one epoch and two of the next
    assert sorted(first[:5]) == list(range(5))
    resumed = DataCursor(5, seed=3, shuffle=True, **cursor.state())
    assert resumed.take(6) == cursor.take(6)
    assert DataCursor(4, seed=0, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="no training examples"):
        DataCursor(0, seed=0, shuffle=True)


def test_make_optimizer_follows_the_config():
    import torch

    from sdft_fast.config import TrainConfig
    from sdft_fast.schedule import make_optimizer

    weight = torch.nn.Parameter(torch.zeros(3))
    adamw, _ = make_optimizer([weight], TrainConfig(adam_eps=1e-4, adam_betas=(0.8, 0.9)), 10)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["eps"] == 1e-4 and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    sgd, _ = make_optimizer([weight], TrainConfig(optimizer="sgd", momentum=0.5, lr=0.1), 10)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    # A large eps shrinks a small gradient's step below lr (Adam's normalised step is about lr).
    for eps, expect_full_step in ((1e-8, True), (1e-2, False)):
        p = torch.nn.Parameter(torch.zeros(1))
        optimizer, _ = make_optimizer([p], TrainConfig(lr=1.0, adam_eps=eps), 10)
        p.grad = torch.full((1,), 1e-4)
        optimizer.step()
        assert (abs(float(p)) > 0.5) is expect_full_step
