"""A well-behaved agent: keeps a private scratch file and a turn count, calls the model, and
streams a few chunks, taking a little time so that it overlaps the attack next to it."""

import os
import time

from corral.sdk import App

app = App()


@app.entrypoint
def handle(payload, ctx):
    ctx.state["turns"] = ctx.state.get("turns", 0) + 1
    scratch = os.path.join(os.environ["TMPDIR"], "secret")
    with open(scratch, "w") as f:
        f.write(payload["text"])
    with open(scratch) as f:
        yield "echo:" + f.read()
    for _ in range(5):
        time.sleep(0.05)
    yield "|" + ctx.model.complete(payload["text"])
    yield f"|sum:{sum(range(100_000))}"
