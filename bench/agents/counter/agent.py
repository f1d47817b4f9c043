from typing import Any

from corral.sdk import App, Context

app = App()


@app.entrypoint
def count(payload: Any, ctx: Context) -> Any:
    """Counts its session's turns in the session's state: what a chaos run checks turns by."""
    turns = int(ctx.state.get("turns", 0)) + 1
    ctx.state["turns"] = turns
    return {"turn": turns}
