"""progress-report v2: the same conversation and state, with the note structured as SOAP."""

from collections.abc import AsyncIterator
from typing import Any

from corral.sdk import App, Context

app = App()


@app.entrypoint
async def draft(payload: Any, ctx: Context) -> AsyncIterator[str]:
    text = payload.get("text", "") if isinstance(payload, dict) else str(payload)
    turns = ctx.state.get("turns", 0) + 1
    history = ctx.state.setdefault("conversation", [])
    history.append({"role": "user", "text": text})
    notes = " ".join(m["text"] for m in history if m["role"] == "user")
    with ctx.tracer.start_as_current_span("draft_soap_note"):
        answer = await ctx.model.acomplete(notes, system=ctx.prompt)
    yield f"Turn {turns}. "
    for section in ("S: ", "O: ", "A: ", "P: "):
        yield section + answer + "\n"
    history.append({"role": "assistant", "text": answer})
    ctx.state["turns"] = turns
