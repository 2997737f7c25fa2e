from longreach.cli import app

app()
