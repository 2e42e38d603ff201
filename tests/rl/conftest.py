"""A cold-start checkpoint shared by the end-to-end RL tests."""

import pytest
from rl_fixtures import launch


@pytest.fixture(scope="session")
def coldstart(tmp_path_factory):
    path = tmp_path_factory.mktemp("coldstart")
    launch(1, ["--stage", "sft", "--train-iters", "3", "--global-batch-size", "16",
               "--micro-batch-size", "8", "--rl-eval-size", "8", "--eval-max-new-tokens", "2",
               "--save", str(path)])
    return path
