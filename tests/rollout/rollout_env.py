"""Constants shared by the rollout tests and their fixtures."""

API_KEY = "rollout-test-key"
SERVER_BATCH = (
    4  # small server batches: a rollout batch takes several rounds, so it can be interrupted
)
