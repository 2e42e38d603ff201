"""A calculator tool for chain_sum: ``--rl-rollout-function
megatron_rl.rollouts.calculator:calculator_rollout``.

Turn 1: the model writes a call, e.g. ``CALC 3+4``, ended by a newline (the turn's stop
token). The tool answers every call -- `` = 7\\n``, or `` = error\\n`` for one it cannot
evaluate -- as tool tokens (never trained on). Turn 2: the model states the result; the
reward scores that final answer only.
"""

from __future__ import annotations

import re

from megatron_rl.rollout.trajectory import RolloutContext, Trajectory

CALL = "CALC"
_EXPRESSION = re.compile(r"^\s*-?\d+(\s*[-+]\s*-?\d+)*\s*$")


def calculate(call: str) -> str:
    """The tool: the value of ``CALC <integers joined by + and ->``, or 'error'."""
    text = call.strip()
    if not text.startswith(CALL):
        return "error"
    expression = text[len(CALL):].strip()
    if not _EXPRESSION.match(expression):
        return "error"
    total, sign = 0, 1
    for token in re.findall(r"[-+]|\d+", expression.replace(" ", "")):
        if token in "+-":
            sign = sign if token == "+" else -sign
        else:
            total, sign = total + sign * int(token), 1
    return str(total)


async def calculator_rollout(ctx: RolloutContext) -> Trajectory:
    tokenizer = ctx.tokenizer
    newline = tokenizer.encode("\n", add_special_tokens=False)
    stops = tuple(newline) + ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None
                              else ())
    call = await ctx.generate(stop_token_ids=stops)
    call_text = tokenizer.decode(call.output_ids, skip_special_tokens=True)
    # The tool's answer goes in as token ids appended to the trajectory, never as
    # re-tokenised text of the whole conversation (that may tokenise differently).
    ctx.insert(tokenizer.encode(f" = {calculate(call_text)}\n", add_special_tokens=False))
    room = ctx.room
    if room < 1:
        return ctx.trajectory(reward=0.0, call=call_text, answer="")
    answer = await ctx.generate(max_new_tokens=min(room, ctx.max_new_tokens))
    answer_text = tokenizer.decode(answer.output_ids, skip_special_tokens=True)
    return ctx.trajectory(reward=float(ctx.score(answer_text)), call=call_text,
                          answer=answer_text)
