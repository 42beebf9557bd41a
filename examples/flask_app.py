"""Flask with its sessions in memcached. Run: MEMSESS_SAVE_PATH="tcp://127.0.0.1:11211"
flask --app examples/flask_app.py run   (then open /login/alice, /, /logout)"""

import os

from flask import Flask, session

from memsess.adapters.flask import init_app

app = Flask(__name__)
app.config["MEMSESS_SAVE_PATH"] = os.environ.get("MEMSESS_SAVE_PATH", "tcp://127.0.0.1:11211")
init_app(app)


@app.get("/")
def index() -> str:
    session["visits"] = session.get("visits", 0) + 1
    return f"{session.get('user', 'anonymous')}, visit {session['visits']}\n"


@app.get("/login/<user>")
def login(user: str) -> str:
    session["user"] = user
    session.regenerate()  # a new session id at login: no session fixation
    return f"logged in as {user}\n"


@app.get("/logout")
def logout() -> str:
    session.clear()  # deletes every copy and the cookie
    return "logged out\n"
