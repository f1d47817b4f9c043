from typing import Any

from corral.sdk import App, Context

app = App()


@app.entrypoint
def echo(payload: Any, ctx: Context) -> Any:
    return payload
