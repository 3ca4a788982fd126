"""StreamHash: the sha256 of a buffer taken while it fills equals the one taken after."""

import asyncio
import hashlib
import os

import numpy as np
import pytest

from fedray.bridge.streamhash import STEP, StreamHash


@pytest.mark.parametrize("size", [0, 1, STEP - 1, STEP, 3 * STEP + 12345])
@pytest.mark.parametrize("chunk", [1 << 20, 777_777])
def test_the_streamed_digest_is_the_whole_buffers(size, chunk):
    source = os.urandom(size)
    buffer = np.empty(size, np.uint8)

    async def fill() -> str:
        hasher = StreamHash(buffer)
        for start in range(0, size, chunk):
            end = min(start + chunk, size)
            buffer[start:end] = np.frombuffer(source[start:end], np.uint8)
            await hasher.advance(end)
        return await hasher.hexdigest(size)

    assert asyncio.run(fill()) == hashlib.sha256(source).hexdigest()
