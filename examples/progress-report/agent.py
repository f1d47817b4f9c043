"""progress-report v1: counts turns, keeps the conversation, streams a drafted progress note."""

from collections.abc import Iterator
from typing import Any

from corral.sdk import App, Context

app = App()


@app.entrypoint
def draft(payload: Any, ctx: Context) -> Iterator[str]:
    text = payload.get("text", "") if isinstance(payload, dict) else str(payload)
    turns = ctx.state.get("turns", 0) + 1
    history = ctx.state.setdefault("conversation", [])
    history.append({"role": "user", "text": text})
    with ctx.tracer.start_as_current_span("draft_note") as span:
        span.set_attribute("progress_report.turn", turns)
        notes = " ".join(m["text"] for m in history if m["role"] == "user")
        answer = ctx.model.complete(notes, system=ctx.prompt)
    yield f"Turn {turns}. "
    yield "Progress note (draft): "
    for word in answer.split(" "):
        yield word + " "
    history.append({"role": "assistant", "text": answer})
    ctx.state["turns"] = turns
