from typing import Any

from corral.sdk import App, Context

app = App()


@app.entrypoint
def calls(payload: Any, ctx: Context) -> str:
    answer = "none"
    for i in range(payload["k"]):
        answer = ctx.model.complete(f"benchmark prompt number {i} about latency")
    return answer
