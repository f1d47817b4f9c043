"""A hello-world agent for AWS Bedrock AgentCore Runtime, written with AWS's bedrock-agentcore SDK
as AWS documents it; it runs on Corral unchanged. No model: it answers from what it remembers of
the session, so every reply is deterministic.

Payload: {"prompt": "..."} for one JSON reply; add "stream": true for the reply as server-sent
events, word by word; {"background_s": n} starts background work that /ping reports as
HealthyBusy for n seconds; {"fail": true} raises (a 500); {"note": "..."} also prints a line and
logs a warning (which `corral logs` shows under the invocation).
"""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from bedrock_agentcore.runtime import BedrockAgentCoreApp, RequestContext

app = BedrockAgentCoreApp()

# Conversation memory, in-process and keyed by the runtime session: AgentCore (and Corral) keep
# one session on one instance of the agent for the session's whole life.
# session_id is None for a request without a session header: those share one memory.
conversations: dict[str | None, list[str]] = {}


def reply_to(session_id: str | None, prompt: str) -> str:
    earlier = conversations.setdefault(session_id, [])
    if earlier:
        answer = f"Hello again! You said: {prompt}. Before that: {'; '.join(earlier)}."
    else:
        answer = f"Hello! You said: {prompt}."
    earlier.append(prompt)
    return answer


async def stream_reply(answer: str) -> AsyncIterator[str]:
    for word in answer.split(" "):
        await asyncio.sleep(0.01)
        yield word + " "


def background_work(task_id: int, seconds: float) -> None:
    time.sleep(seconds)
    app.complete_async_task(task_id)


@app.entrypoint
def invoke(
    payload: dict[str, Any], context: RequestContext
) -> dict[str, Any] | AsyncIterator[str]:
    if payload.get("fail"):
        raise RuntimeError("asked to fail")
    if payload.get("note"):
        print(f"note for session {context.session_id}")
        logging.getLogger("agentcore-hello").warning("the note: %s", payload["note"])
    if payload.get("background_s"):
        # While this task runs, /ping answers HealthyBusy and the session is not idle.
        task_id = app.add_async_task("background_work")
        threading.Thread(
            target=background_work, args=(task_id, float(payload["background_s"])), daemon=True
        ).start()
        return {"result": "started background work", "task_id": task_id}
    answer = reply_to(context.session_id, payload.get("prompt", "nothing"))
    if payload.get("stream"):
        return stream_reply(answer)
    return {"result": answer, "session_id": context.session_id}


if __name__ == "__main__":
    app.run()
