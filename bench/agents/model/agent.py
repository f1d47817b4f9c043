from corral.sdk import App

app = App()


@app.entrypoint
def calls(payload, ctx):
    answer = "none"
    for i in range(payload["k"]):
        answer = ctx.model.complete(f"benchmark prompt number {i} about latency")
    return answer
