import time
from collections.abc import Iterator
from typing import Any

from corral.sdk import App, Context

app = App()


@app.entrypoint
def stream(payload: Any, ctx: Context) -> Iterator[str]:
    for i in range(4):
        if i:
            time.sleep(0.01)
        yield f"chunk {i};"
