import time

from corral.sdk import App

app = App()


@app.entrypoint
def stream(payload, ctx):
    for i in range(4):
        if i:
            time.sleep(0.01)
        yield f"chunk {i};"
