"""Quart with its sessions in memcached. Run: MEMSESS_SAVE_PATH="tcp://127.0.0.1:11211"
python examples/quart_app.py   (without MEMSESS_SAVE_PATH, on three memcached servers
started for the demo), then open http://127.0.0.1:5000/login/alice, /, /logout."""

import os

from quart import Blueprint, Quart, session, websocket

from memsess.adapters.quart import init_app

pages = Blueprint("pages", __name__)


@pages.get("/")
async def index() -> str:
    session["visits"] = session.get("visits", 0) + 1
    return f"{session.get('user', 'anonymous')}, visit {session['visits']}\n"


@pages.get("/login/<user>")
async def login(user: str) -> str:
    session["user"] = user
    session.regenerate()  # a new session id at login: no session fixation
    return f"logged in as {user}\n"


@pages.get("/logout")
async def logout() -> str:
    session.clear()  # deletes every copy and the cookie
    return "logged out\n"


@pages.websocket("/ws")
async def hello() -> None:
    await websocket.send(f"hello {session.get('user', 'anonymous')}")  # read, never saved


def create_app(save_path: str) -> Quart:
    app = Quart(__name__)
    app.config["MEMSESS_SAVE_PATH"] = save_path
    init_app(app)  # the store is closed when the app stops serving
    app.register_blueprint(pages)
    return app


app = create_app(os.environ.get("MEMSESS_SAVE_PATH", "tcp://127.0.0.1:11211"))

if __name__ == "__main__":
    if "MEMSESS_SAVE_PATH" in os.environ:
        app.run()
    else:
        from memsess.testing import LocalCluster

        with LocalCluster(3) as cluster:
            create_app(cluster.dsn()).run()
