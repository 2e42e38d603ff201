"""A user reward function, imported by path in a test."""


def length_reward(response: str, item) -> float:
    return float(len(response))
