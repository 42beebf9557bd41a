"""Any WSGI app with its sessions in memcached. Run: MEMSESS_SAVE_PATH="tcp://127.0.0.1:11211"
python examples/wsgi_app.py   (then open http://127.0.0.1:8000/)"""

import os
from wsgiref.simple_server import make_server

import memsess
from memsess.adapters.wsgi import SessionMiddleware


def hello(environ, start_response):
    session = environ["memsess.session"]  # loaded from memcached on first use
    session["visits"] = session.get("visits", 0) + 1
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"visit {session['visits']}\n".encode()]


store = memsess.SessionStore.from_dsn(os.environ.get("MEMSESS_SAVE_PATH", "tcp://127.0.0.1:11211"))
app = SessionMiddleware(hello, store, secure=False)  # secure=True behind HTTPS

if __name__ == "__main__":
    make_server("127.0.0.1", 8000, app).serve_forever()
