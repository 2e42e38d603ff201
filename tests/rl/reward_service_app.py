"""The reference reward service with misbehaving endpoints beside /score, for the tests of
--rl-reward-url: /flaky fails twice with 503 then scores; /bad answers 400; /nan answers a
NaN reward; /slow holds each request 0.2 s and counts the most in flight (GET /inflight).
Every /score request is appended to --log as one JSON line."""

import argparse
import asyncio
import json
import math

import uvicorn
from fastapi import HTTPException, Request

from megatron_rl.data.tasks import Task, TaskConfig
from megatron_rl.rewards.server import build_app, score_batch

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--log", required=True)
args = parser.parse_args()
task = Task(TaskConfig(task_size=1, eval_size=0), seed=0)
app = build_app(task)
state = {"flaky": 0, "now": 0, "most": 0}


@app.middleware("http")
async def log_scores(request: Request, call_next):
    if request.url.path == "/score":
        body = await request.body()
        with open(args.log, "a") as f:
            f.write(body.decode() + "\n")
    return await call_next(request)


@app.post("/flaky")
async def flaky(request: Request) -> dict:
    state["flaky"] += 1
    if state["flaky"] <= 2:
        raise HTTPException(503, "warming up")
    rewards, errors = score_batch(task, (await request.json())["samples"])
    return {"rewards": rewards, "errors": errors, "attempts": state["flaky"]}


@app.post("/bad")
async def bad() -> dict:
    raise HTTPException(400, "reward model rejects this prompt format")


@app.post("/nan")
async def nan(request: Request):
    from fastapi.responses import Response

    rows = (await request.json())["samples"]
    return Response(json.dumps({"rewards": [1.0] * (len(rows) - 1) + [math.nan]}),
                    media_type="application/json")


@app.post("/slow")
async def slow(request: Request) -> dict:
    state["now"] += 1
    state["most"] = max(state["most"], state["now"])
    try:
        await asyncio.sleep(0.2)
        return {"rewards": [0.5] * len((await request.json())["samples"])}
    finally:
        state["now"] -= 1


@app.get("/inflight")
def inflight() -> dict:
    return {"most": state["most"]}


uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
