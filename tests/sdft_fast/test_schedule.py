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
