"""A reference reward service (the protocol is in ``megatron_rl/rewards/remote.py``), scoring
with a task's own scorer -- exactly what the trainer computes locally -- or a user reward
function. Copy it and put a reward model behind ``score_batch``::

    python -m megatron_rl.rewards.server --task chain_sum --port 8500
    pretrain_rl.py ... --rl-reward-url http://127.0.0.1:8500/score

With $MEGATRON_RL_REWARD_API_KEY set, requests must carry 'Authorization: Bearer <key>'.
"""

import argparse
import logging
import os
import secrets

from megatron_rl.data.tasks import Task, TaskConfig, TaskItem
from megatron_rl.rewards.remote import API_KEY_ENV

logger = logging.getLogger(__name__)


def score_batch(task: Task, rows: list[dict]) -> tuple[list[float], list[str | None]]:
    """Rewards (and per-sample errors) of one request's samples. A scorer that raises on a
    response gives 0 with the error, as local scoring does."""
    rewards, errors = [], []
    for row in rows:
        item = TaskItem(index=int(row["index"]), prompt=row["prompt"], answer=row["answer"],
                        entry={"question": row["question"], "answer": row["answer"],
                               "metadata": row.get("metadata", {})})
        try:
            rewards.append(task.score(row["response"], item))
            errors.append(None)
        except Exception as exc:  # a scorer may raise on odd text; RewardError included
            rewards.append(0.0)
            errors.append(repr(exc))
    return rewards, errors


def build_app(task: Task, api_key: str | None = None):
    """The FastAPI app: ``POST /score`` and ``GET /health``."""
    from fastapi import FastAPI, HTTPException, Request

    app = FastAPI(title="megatron_rl reward service")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/score")
    async def score(request: Request) -> dict:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {api_key}"):
                raise HTTPException(401, "missing or wrong API key")
        body = await request.json()
        rows = body.get("samples") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise HTTPException(400, 'expected {"samples": [...]}')
        missing = [f"samples[{i}].{key}" for i, row in enumerate(rows)
                   for key in ("index", "prompt", "question", "response", "answer")
                   if not isinstance(row, dict) or key not in row]
        if missing:
            raise HTTPException(400, f"missing fields: {', '.join(missing[:5])}")
        rewards, errors = score_batch(task, rows)
        return {"rewards": rewards, "errors": errors}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default=TaskConfig.task, help="as the trainer's --rl-task")
    parser.add_argument("--task-config", default=TaskConfig.task_config,
                        help="as the trainer's --rl-task-config")
    parser.add_argument("--reward-function", default=None,
                        help="as the trainer's --rl-reward-function")
    parser.add_argument("--binary-reward", action=argparse.BooleanOptionalAction, default=True,
                        help="as the trainer's --rl-binary-reward")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # The scorer needs no data: the smallest sets that build.
    task = Task(TaskConfig(task=args.task, task_config=args.task_config, task_size=1,
                           eval_size=0, reward_function=args.reward_function,
                           binary_reward=args.binary_reward), seed=0)
    import uvicorn

    uvicorn.run(build_app(task, os.environ.get(API_KEY_ENV) or None), host=args.host,
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
