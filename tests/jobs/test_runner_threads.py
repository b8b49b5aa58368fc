"""Which trial a job's start runs first: export rebuilds a trial with the thread count of the start
that ran it (job.json's ``threads``), so trials enqueued before the start must count as its own."""

import optuna
import pytest

from slimsearch.jobs.runner import first_unrun


@pytest.fixture
def study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=optuna.storages.InMemoryStorage())


def test_a_fresh_study_starts_at_trial_zero(study):
    assert first_unrun(study) == 0


def test_trials_enqueued_before_the_start_are_the_starts_own(study):
    for x in range(3):
        study.enqueue_trial({"x": x})
    assert len(study.trials) == 3 and first_unrun(study) == 0


def test_after_finished_trials_the_start_runs_the_next_one(study):
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert first_unrun(study) == 2
    study.enqueue_trial({"x": 0.5})
    assert first_unrun(study) == 2
