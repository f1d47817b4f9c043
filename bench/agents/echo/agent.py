from corral.sdk import App

app = App()


@app.entrypoint
def echo(payload, ctx):
    return payload
