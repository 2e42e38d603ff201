"""A reward for the dynamic-sampling run: groups of even training items never vary (always
filtered out); odd items get a pseudo-random 0/1 per distinct response (mixed groups)."""

import zlib


def reward(response: str, item) -> float:
    if item.index % 2 == 0:
        return 0.0
    return float(zlib.crc32(response.encode()) % 2)
