"""Early stopping: improvement by more than min_delta resets patience; the best validation is reported."""

import math

from nemo_customizer.training.early_stopping import EarlyStopping


def test_first_validation_is_best_and_improvements_reset_patience():
    stopper = EarlyStopping(patience=2, min_delta=0.001)
    assert stopper.update(1.0, at=1) is True
    assert stopper.update(0.9995, at=2) is False  # better, but not by more than min_delta
    assert stopper.bad_validations == 1 and not stopper.should_stop
    assert stopper.update(0.95, at=3) is True
    assert (stopper.best, stopper.best_at, stopper.bad_validations) == (0.95, 3, 0)


def test_stops_after_patience_validations_without_improvement():
    stopper = EarlyStopping(patience=3, min_delta=0.001)
    stopper.update(1.0, at=1)
    for at, loss in enumerate([1.2, 1.0, 0.9999], start=2):
        assert stopper.should_stop is False
        stopper.update(loss, at=at)
    assert stopper.should_stop is True
    assert stopper.best == 1.0 and stopper.best_at == 1


def test_disabled_never_stops_but_still_tracks_best():
    stopper = EarlyStopping(patience=1, min_delta=0.0, enabled=False)
    stopper.update(2.0, at=1)
    stopper.update(3.0, at=2)
    stopper.update(4.0, at=3)
    assert stopper.should_stop is False and stopper.best == 2.0


def test_nan_validation_is_never_best():
    stopper = EarlyStopping(patience=2)
    stopper.update(1.0, at=1)
    assert stopper.update(math.nan, at=2) is False
    assert stopper.best == 1.0
